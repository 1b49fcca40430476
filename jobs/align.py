"""Ray job entry point for the alignment stage alone: base -> align -> evaluate the aligned model.

    ray job submit --working-dir . --runtime-env infra/runtime_env.yaml -- \\
        python jobs/align.py --config configs/quickstart.yaml align.method=vaa align.workers=2 align.zero_stage=2

The same arguments as jobs/run.py (it is jobs/run.py with --until=aligned): VAA reads `align.vaa.group_file`
from stage 1 (jobs/groups.py) or runs stage 1 first; the aligned model lands under the shared storage path,
where a later `jobs/run.py` with the same config reuses it.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.argv.insert(1, "--until=aligned")
    runpy.run_path(str(Path(__file__).with_name("run.py")), run_name="__main__")
