"""Gradient surgery: remove from the user-task gradient the part that undoes alignment.

When g_u . g_a < 0 (fine-tuning on the user's batch would raise the alignment loss to first order), g_u is replaced by
its projection on the plane orthogonal to g_a:  g_u - (g_u . g_a / ||g_a||^2) g_a,  after which g_u . g_a = 0.
Otherwise g_u is returned as is: the very same tensors, so a step without conflict is bit-for-bit plain fine-tuning.

Two granularities. "global" treats all trainable parameters as one vector (one test, one coefficient). "per_tensor"
tests and projects each parameter tensor on its own, which removes more conflict (a global agreement can hide
per-layer disagreement) at the price of changing the direction more.

The inputs are lists of tensors in parameter order, already averaged over ranks by the engine, so every rank computes
the same dot products and applies the same projected gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MODES = ("global", "per_tensor")


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of elementwise products over all tensors, in float64 so that the sign test is not a rounding artefact."""
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True))


def cosine(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """cos(a, b) over all tensors together; 0 when either is zero."""
    na, nb = _dot(a, a).sqrt(), _dot(b, b).sqrt()
    return float(_dot(a, b) / (na * nb)) if na > 0 and nb > 0 else 0.0


@torch.no_grad()
def project(g_u: Sequence[torch.Tensor], g_a: Sequence[torch.Tensor], mode: str = "global") -> tuple[list[torch.Tensor], float]:
    """(projected g_u, conflict rate): the rate is 0/1 in global mode, the share of tensors projected per tensor.

    Tensors without conflict (or with a zero g_a) are returned unchanged, as the same objects.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if len(g_u) != len(g_a):
        raise ValueError(f"{len(g_u)} user gradient tensors but {len(g_a)} alignment gradient tensors")
    if mode == "global":
        dot, norm2 = _dot(g_u, g_a), _dot(g_a, g_a)
        if not (dot < 0 and norm2 > 0):
            return list(g_u), 0.0
        coef = dot / norm2
        return [(u.double() - coef * a.double()).to(u.dtype) for u, a in zip(g_u, g_a, strict=True)], 1.0
    out, projected = [], 0
    for u, a in zip(g_u, g_a, strict=True):
        dot, norm2 = _dot([u], [a]), _dot([a], [a])
        if dot < 0 and norm2 > 0:
            out.append((u.double() - (dot / norm2) * a.double()).to(u.dtype))
            projected += 1
        else:
            out.append(u)
    return out, projected / max(len(g_u), 1)
