"""This machine's matmul ceiling at a model's shapes: what a throughput is a share of (imported by the benches).

    python jobs/bench/ceiling.py [--threads N]   # one JSON line: GFLOP/s per shape and dtype

A model's step is mostly matmuls of (tokens x hidden) @ (hidden x intermediate). Timed here alone, with the
threads the benches give torch, in fp32 and bf16: the best a forward or a step could reach. A throughput in
tokens/s converts to GFLOP/s by the model's FLOPs per token (`flops_per_token`): 2 x parameters for a forward
(a decode step or a prefill), 6 x for a full training step, 4 x for a LoRA step (no weight gradient for the frozen
weights), 2 x more with gradient checkpointing (the forward again).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

SHAPES = {"decode": (64, 576, 1536), "train": (2048, 576, 1536)}  # SmolLM2-135M: hidden 576, MLP 1536


def gflops(m: int, k: int, n: int, dtype: torch.dtype, seconds: float = 0.6) -> float:
    """Sustained GFLOP/s of (m x k) @ (k x n) in `dtype`: the best of three timed spans after a warm-up."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    for _ in range(3):
        torch.mm(a, b)
    best = 0.0
    for _ in range(3):
        reps, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / 3:
            torch.mm(a, b)
            reps += 1
        best = max(best, 2 * m * k * n * reps / elapsed / 1e9)
    return best


def ceilings() -> dict[str, float]:
    """{"<shape>_<dtype>_gflops": GFLOP/s} for the decode and training shapes, fp32 and bf16."""
    return {f"ceiling_{name}_{dt}_gflops": round(gflops(*shape, getattr(torch, dt)), 1)
            for name, shape in SHAPES.items() for dt in ("float32", "bfloat16")}


def flops_per_token(params: int, kind: str, lora: bool = False, recompute: bool = False) -> float:
    """FLOPs per token: forward 2N; a training step 6N (full), 4N (LoRA); +2N with gradient checkpointing."""
    if kind == "forward":
        return 2.0 * params
    return (4.0 if lora else 6.0) * params + (2.0 * params if recompute else 0.0)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps({"bench": "ceiling", "threads": args.threads, **ceilings()}))
