"""Ray job entry point for the main pipeline.

    ray job submit --working-dir . --runtime-env infra/runtime_env.yaml -- python jobs/run.py --config configs/quickstart.yaml

Also runs directly: `python jobs/run.py --config configs/quickstart.yaml`. Under a Ray job
(RAY_ADDRESS set by `ray job submit`) the pipeline runs as one Ray task on any node with a free CPU,
so the driver on the head stays light; otherwise it runs in this process. Outputs (stages,
checkpoints) go to STORAGE/outputs on a filesystem every node shares, STORAGE being --storage-path or
$HFTLAB_STORAGE_PATH (set by infra/runtime_env.yaml); MLflow to tracking.tracking_uri, else $MLFLOW_TRACKING_URI.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # works without an install too

from hftlab.config import ConfigError, load_config  # noqa: E402
from hftlab.run.pipeline import run  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--num-cpus", type=float, default=1.0, help="CPUs the pipeline task reserves on the cluster")
    ap.add_argument("--num-gpus", type=float, default=0.0, help="GPUs the pipeline task reserves on the cluster")
    ap.add_argument("--storage-path", default=os.environ.get("HFTLAB_STORAGE_PATH"),
                    help="shared storage root: output_dir becomes STORAGE/outputs (an explicit output_dir= override wins)")
    ap.add_argument("--until", choices=["aligned", "finetuned"], default="finetuned",
                    help="the last model to train and evaluate (jobs/align.py: aligned)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    storage = [f"output_dir={Path(args.storage_path) / 'outputs'}"] if args.storage_path else []
    try:
        cfg = load_config(args.config, storage + args.overrides)  # fail here, before anything is scheduled
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if not os.environ.get("RAY_ADDRESS"):
        run(cfg, until=args.until)
        return 0
    if not Path(cfg.output_dir).is_absolute():
        print(f"warning: output_dir={cfg.output_dir} is relative: it lands in this job's temporary copy of the working "
              "dir; set HFTLAB_STORAGE_PATH or --storage-path to a shared filesystem", file=sys.stderr)
    import ray

    ray.init()  # bare: the submitter's runtime_env (working_dir, env_vars) stays in force
    task = ray.remote(num_cpus=args.num_cpus, num_gpus=args.num_gpus)(run)
    summary = ray.get(task.remote(cfg, until=args.until))
    print({k: summary.get(k) for k in ("base", "aligned", "finetuned", "run_id", "tracking_uri")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
