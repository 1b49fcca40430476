"""Ray job entry point for the main pipeline.

    ray job submit --working-dir . -- python jobs/run.py --config configs/quickstart.yaml align.lr=1e-4

Also runs directly: `python jobs/run.py --config configs/quickstart.yaml`. Under a Ray job
(RAY_ADDRESS set by `ray job submit`) the pipeline runs as one Ray task on a worker, so the driver
stays light; otherwise it runs in this process.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # works without an install too

from hftlab.config import ConfigError, load_config  # noqa: E402
from hftlab.pipeline import run  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--num-cpus", type=float, default=1.0, help="CPUs the pipeline task reserves on the cluster")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    try:
        cfg = load_config(args.config, args.overrides)  # fail here, before anything is scheduled
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if not os.environ.get("RAY_ADDRESS"):
        run(cfg)
        return 0
    import ray

    ray.init()  # bare: the submitter's runtime_env stays in force
    summary = ray.get(ray.remote(num_cpus=args.num_cpus)(run).remote(cfg))
    print({stage: summary[stage] for stage in ("base", "aligned", "finetuned")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
