"""Ray job entry point for sweeps (`hftlab sweep`), and the paper-style report at the end.

    ray job submit --working-dir . --runtime-env infra/runtime_env.yaml -- \
        python jobs/sweep.py --sweep configs/sweeps/table2-poison-ratio.yaml
    ray job submit ... -- python jobs/sweep.py --sweep configs/sweeps/table2-poison-ratio.yaml --resume

Also runs directly (a local Ray instance): `python jobs/sweep.py --sweep configs/sweeps/vaa-lambda-eta.yaml`.
Under a Ray job the driver connects to the cluster (RAY_ADDRESS) and Tune places the trials. Stage outputs
go to `--storage-path` (default $HFTLAB_STORAGE_PATH)/outputs and the Tune experiment to .../tune, a
filesystem every node shares, so a resumed sweep (`--resume`, any node) finds both.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # works without an install too

from hftlab.cli import main as hftlab  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", required=True, help="a sweep file under configs/sweeps/")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    ap.add_argument("--storage-path", default=os.environ.get("HFTLAB_STORAGE_PATH"),
                    help="shared storage root: STORAGE/outputs for stages, STORAGE/tune for the Tune experiment")
    ap.add_argument("overrides", nargs="*", help="dotted overrides; sweep.<field>=... for the sweep file's own fields")
    args = ap.parse_args()
    storage = ([f"output_dir={Path(args.storage_path) / 'outputs'}", f"sweep.storage_path={Path(args.storage_path) / 'tune'}"]
               if args.storage_path else [])
    return hftlab(["sweep", args.sweep, *storage, *args.overrides, *(["--resume"] if args.resume else [])])


if __name__ == "__main__":
    sys.exit(main())
