"""Ray job entry point for VAA stage 1 (vulnerability groups).

    ray job submit --working-dir . --runtime-env infra/runtime_env.yaml -- python jobs/groups.py --config configs/smoke.yaml

Under a Ray job (RAY_ADDRESS set by `ray job submit`) the whole stage (proxy fine-tuning, then the
(checkpoint x example) matrix on Ray Data, whose actors spread over the cluster with
groups.cpus_per_actor / groups.gpus_per_actor each) runs from one Ray task, so the driver on the head
stays light. Outputs go to `--storage-path` (default $HFTLAB_STORAGE_PATH)/outputs, shared by all nodes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # works without an install too

from hftlab.config import ConfigError, load_config  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--num-cpus", type=float, default=1.0,
                    help="CPUs the stage's task reserves; the cluster needs these plus groups.actors x groups.cpus_per_actor")
    ap.add_argument("--num-gpus", type=float, default=0.0, help="GPUs the proxy fine-tuning task reserves on the cluster")
    ap.add_argument("--storage-path", default=os.environ.get("HFTLAB_STORAGE_PATH"),
                    help="shared storage root: output_dir becomes STORAGE/outputs (an explicit output_dir= override wins)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    storage = [f"output_dir={Path(args.storage_path) / 'outputs'}"] if args.storage_path else []
    try:
        cfg = load_config(args.config, storage + args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    import ray

    ray.init()  # bare: joins the cluster of `ray job submit` (or starts a local one), keeps its runtime_env
    from hftlab.groups.stage import run_groups

    if os.environ.get("RAY_ADDRESS"):
        summary = ray.get(ray.remote(num_cpus=args.num_cpus, num_gpus=args.num_gpus)(run_groups).remote(cfg))
    else:
        summary = run_groups(cfg)
    print({k: summary[k] for k in ("n_examples", "n_vulnerable", "vulnerable_share", "group_file")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
