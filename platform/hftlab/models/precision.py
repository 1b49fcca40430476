"""Which floating-point format a model computes in: bf16 where the hardware has it, fp32 elsewhere.

`base.dtype: auto` is resolved here, at run time, so one config runs fast on a bf16 CPU (AVX512-BF16 or AMX: bf16
matmuls at ~3x fp32's GFLOP/s, jobs/bench/generation.py measures both) or a GPU, and exactly as before on a CPU
without bf16 (CI's machine is such a CPU today but may not stay one).

Under `auto` the weights that train stay float32 (the optimizer's state and every update in full precision) and the
forward and backward run under bf16 autocast; a model that only answers (evaluation, vLLM) is loaded in bf16. An
explicit `float32` / `bfloat16` / `float16` is the weights' dtype everywhere, as it always was.
"""

from __future__ import annotations

import contextlib
from functools import cache
from pathlib import Path

import torch

DTYPES = ("auto", "float32", "bfloat16", "float16")


@cache
def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def has_bf16() -> bool:
    """bf16 is fast here: a CUDA GPU, or a CPU with bf16 instructions."""
    return torch.cuda.is_available() or cpu_has_bf16()


def resolve(dtype: str) -> str:
    """`auto` -> bfloat16 where bf16 is fast, else float32; any other name as it is. The compute dtype."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if has_bf16() else "float32"


def weights_for_training(dtype: str) -> str:
    """The dtype the weights train in: float32 under `auto` (bf16 is autocast's business), else `dtype` itself."""
    return "float32" if dtype == "auto" else dtype


def autocast_dtype(dtype: str) -> str | None:
    """The autocast dtype of a training step under `dtype` (None: no autocast; only `auto` on bf16 hardware)."""
    return "bfloat16" if dtype == "auto" and has_bf16() else None


def autocast(dtype: str | None, device_type: str | None = None):
    """A bf16 autocast context on `device_type` (default: the CUDA GPU if any, else the CPU), or nothing for None or
    float32: linear layers and attention run in bf16, reductions such as the loss's softmax stay in fp32."""
    if dtype in (None, "float32"):
        return contextlib.nullcontext()
    dev = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.autocast(dev, dtype=getattr(torch, dtype))


def training_key(dtype: str) -> dict[str, str]:
    """What a training stage's cache key adds for its precision: nothing in float32 (a float32 stage keeps the key it
    always had), the autocast dtype when `auto` trains under one (its weights differ from fp32's in the last bits)."""
    cast = autocast_dtype(dtype)
    return {"autocast": cast} if cast else {}
