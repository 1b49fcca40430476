"""SAM-style weight perturbation: eps = rho * g / ||g||, applied to the weights and undone exactly.

VAA evaluates the sampled group's loss at theta + eps, the worst-case nearby weights to first order, so alignment
learns weights whose safety survives a small harmful update. ||g|| is the global L2 norm over all trainable
parameters, not per tensor, so eps has norm rho as a whole.

Restoring theta copies saved originals back instead of subtracting eps: (theta + eps) - eps is not theta in
floating point, and a drift of a few ulps per step would accumulate over training. The price is one copy of the
trainable parameters while perturbed.

Everything here reads and writes `p.grad` / `p.data`, so it suits engines whose gradients live in `p.grad` after
backward (single process, DDP). Sharded engines (ZeRO-2/3, FSDP) must gather them or supply their own versions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

GradNormFn = Callable[[list[torch.Tensor]], torch.Tensor]


def trainable_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the optimizer updates: those that perturbation acts on."""
    return [p for p in model.parameters() if p.requires_grad]


def local_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm over this process's gradient tensors, accumulated in float32 (bf16 sums lose digits)."""
    if not grads:
        return torch.zeros(())
    device = grads[0].device
    norms = [torch.linalg.vector_norm(g.detach().float()).to(device) for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms))


@torch.no_grad()
def compute_eps(params: Sequence[torch.Tensor], rho: float, grad_norm_fn: GradNormFn | None = None) -> list[torch.Tensor]:
    """eps_i = rho * g_i / ||g|| for every param (zeros where .grad is None, and everywhere when ||g|| = 0).

    `grad_norm_fn(grads)` returns the global norm of the listed gradients; a distributed engine passes one that
    all-reduces the squared sums when gradients are sharded. Default: `local_grad_norm`. No host sync is needed.
    """
    grads = [p.grad for p in params if p.grad is not None]
    norm = (grad_norm_fn or local_grad_norm)(grads) if grads else torch.zeros(())
    norm = torch.as_tensor(norm, dtype=torch.float32)
    # rho / 0 is inf, but `where` discards it: a zero gradient gives eps = 0 exactly, never nan
    scale = torch.where(norm > 0, rho / norm, torch.zeros_like(norm))
    eps = []
    for p in params:
        if p.grad is None:
            eps.append(torch.zeros_like(p))
        else:
            eps.append((p.grad.detach().float() * scale.to(p.grad.device)).to(p.dtype))
    return eps


@torch.no_grad()
def apply(params: Sequence[torch.Tensor], eps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """theta <- theta + eps in place; returns copies of the original data, which `restore` needs."""
    if len(params) != len(eps):
        raise ValueError(f"{len(params)} params but {len(eps)} eps tensors")
    backup = [p.detach().clone() for p in params]
    for p, e in zip(params, eps, strict=True):
        p.add_(e)
    return backup


@torch.no_grad()
def restore(params: Sequence[torch.Tensor], backup: Sequence[torch.Tensor]) -> None:
    """Copy the saved originals back: theta is bit-for-bit what it was before `apply`."""
    for p, b in zip(params, backup, strict=True):
        p.copy_(b)


@contextmanager
def perturbed(params: Sequence[torch.Tensor], eps: Sequence[torch.Tensor]) -> Iterator[None]:
    """Inside the block the params are theta + eps; on exit (also on error) they are exactly theta again."""
    backup = apply(params, eps)
    try:
        yield
    finally:
        restore(params, backup)
