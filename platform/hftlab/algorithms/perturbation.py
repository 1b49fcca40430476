"""SAM-style weight perturbation: eps = rho * g / ||g||, applied to the weights and undone exactly.

VAA evaluates the sampled group's loss at theta + eps, the worst-case nearby weights to first order, so alignment
learns weights whose safety survives a small harmful update. ||g|| is the global L2 norm over all trainable
parameters, not per tensor, so eps has norm rho as a whole.

Restoring theta copies saved originals back instead of subtracting eps: (theta + eps) - eps is not theta in
floating point, and a drift of a few ulps per step would accumulate over training. The price is one copy of the
trainable parameters while perturbed.

The gradient comes in as a list (the engine's probe gradient, already averaged over ranks), so eps is the same on
every rank and no `.grad` is read: the same code serves one process, DDP and DeepSpeed ZeRO-2.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch


def trainable_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the optimizer updates: those that perturbation acts on."""
    return [p for p in model.parameters() if p.requires_grad]


def global_norm(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm over all the gradient tensors together, accumulated in float32 (bf16 sums lose digits)."""
    if not grads:
        return torch.zeros(())
    device = grads[0].device
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()).to(device) for g in grads]))


@torch.no_grad()
def compute_eps(grads: Sequence[torch.Tensor], rho: float, norm_eps: float = 0.0) -> list[torch.Tensor]:
    """eps_i = rho * g_i / (||g|| + norm_eps) over all tensors together (all zeros when ||g|| = 0, never nan).
    No host sync. Booster's reference adds norm_eps = 1e-7 to the norm."""
    norm = global_norm(grads).float()
    # rho / 0 is inf, but `where` discards it: a zero gradient gives eps = 0 exactly
    scale = torch.where(norm > 0, rho / (norm + norm_eps), torch.zeros_like(norm))
    return [(g.detach().float() * scale.to(g.device)).to(g.dtype) for g in grads]


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
