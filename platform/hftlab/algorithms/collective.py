"""The few collectives the algorithm steps need, each the identity in one process.

Steps whose terms are not linear in the batch (RepNoise's log and MMD, Vaccine's global norm) use these to
compute the global batch's value on every rank, so N ranks reproduce one process instead of averaging N
per-rank objectives. Only forward values travel: no collective runs inside a backward pass, where it could
interleave with DDP's own gradient all-reduces.
"""

from __future__ import annotations

import torch


def _dist():
    """torch.distributed when a process group with more than one rank is up, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) in one process."""
    d = _dist()
    return (d.get_rank(), d.get_world_size()) if d is not None else (0, 1)


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The sum of `x` over ranks (a detached copy; `x` itself in one process)."""
    d = _dist()
    if d is None:
        return x
    x = x.detach().clone()
    d.all_reduce(x)
    return x


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest of every rank's `value`."""
    d = _dist()
    if d is None:
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    d.all_reduce(t, op=d.ReduceOp.MAX)
    return int(t.item())


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Every rank's rows of `x` ([b_r, ...], equal trailing shape), concatenated in rank order, detached, and b_r per
    rank; `(x, [len(x)])` in one process. Ranks may hold different row counts (padded for the all_gather)."""
    d = _dist()
    if d is None:
        return x, [x.shape[0]]
    n = d.get_world_size()
    count = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    counts = [torch.zeros_like(count) for _ in range(n)]
    d.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in range(n)]
    d.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)]), sizes
