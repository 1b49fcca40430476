"""What a stage costs the machine, and whether the machine has it: peak memory, free disk, writable directories.

Checked before expensive work where it can be foreseen (a plan's output_dir and cache, the space a stage needs),
so a full disk or a read-only directory fails with the field and the value instead of a half-written stage.
"""

from __future__ import annotations

import os
import resource
import shutil
import sys
from pathlib import Path

from hftlab.config.errors import ConfigError


def peak_rss_gb() -> float:
    """This process's peak resident memory so far, GB (the children's, e.g. a vLLM engine, are their own)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def check_writable(field: str, path: str | Path, need_gb: float = 0.0) -> None:
    """`path` (created if missing) takes a file and has `need_gb` free; else a ConfigError naming `field` and `path`."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(field, str(path), f"is not writable ({err.strerror or err})") from None
    free = shutil.disk_usage(path).free / 2**30
    if free < need_gb:
        raise ConfigError(field, str(path), f"has {free:.2f} GB free, and this run needs about {need_gb:.2f} GB")


def kernel_threads() -> str:
    """The torch, OpenMP and MKL thread counts the calling thread's kernels get (MKL's count is per thread), for a
    stage's log line. A sweep trial's threads are its CPUs (sweep/spec.py): with `resources.cpu: 1` a real fine-tuning
    step took 14-19 s on one thread against ~10 s on two, which this line makes plain."""
    import re

    import torch

    info = torch.__config__.parallel_info()
    found = [(name, re.search(rf"{k}_get_max_threads\(\) : (\d+)", info)) for k, name in (("omp", "OpenMP"), ("mkl", "MKL"))]
    return f"{torch.get_num_threads()} threads (" + ", ".join(f"{name} {m[1]}" for name, m in found if m) + ")"
