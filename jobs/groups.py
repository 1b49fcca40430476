"""Ray job entry point for VAA stage 1 (vulnerability groups).

    ray job submit --working-dir . -- python jobs/groups.py --config configs/smoke.yaml groups.actors=4

The driver runs the proxy fine-tuning and submits the (checkpoint x example) matrix to Ray Data,
whose actors spread over the cluster (groups.cpus_per_actor / groups.gpus_per_actor each).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # works without an install too

from hftlab.config import ConfigError, load_config  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    import ray

    ray.init()  # bare: joins the cluster of `ray job submit` (or starts a local one), keeps its runtime_env
    from hftlab.groups.stage import run_groups

    summary = run_groups(cfg)
    print({k: summary[k] for k in ("n_examples", "n_vulnerable", "vulnerable_share", "group_file")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
