"""Keep freed memory in the process instead of handing it back to the OS after every step.

glibc returns a freed block to the kernel when it was mmap-ed (blocks over the mmap threshold) or
sits at the top of the heap beyond the trim threshold. Its defaults raise the mmap threshold only to
the largest block freed so far, and a KV cache grows by a token per decoding step, so decoding keeps
allocating blocks a little larger than any freed before: each is mapped afresh and page-faulted in.
Measured on the quickstart model (1 thread, 4,620 answers): 570,000-680,000 minor faults and 12-15%
of the CPU time in the kernel. Raising both thresholds keeps those pages mapped and reused: decoding
then runs 1.14-1.15x faster (the groups bench's A/B); training, whose tensors keep their sizes, about
1.02x. The cost: a process may keep up to TRIM_THRESHOLD of freed heap, and blocks under 32 MB come
from the heap rather than fresh mappings.

`hftlab/__init__.py` calls this, so every process that imports hftlab has it: the driver, Ray
Data actors, Ray Train workers, spawned benchmark processes. Linux/glibc only; a no-op elsewhere.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

FREED_MEMORY_ENV = "HFTLAB_KEEP_FREED_MEMORY"
"""Set to 0 to leave glibc's defaults (the groups bench measures the difference)."""
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # the ratio glibc's own dynamic thresholds keep


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where there is no glibc (or
    HFTLAB_KEEP_FREED_MEMORY=0)."""
    if os.environ.get(FREED_MEMORY_ENV, "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # macOS, musl: no mallopt
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
