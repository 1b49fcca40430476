"""Curriculum for lambda, the weight of the perturbed objective in VAA.

Early in alignment the model has not yet learned the task, so perturbing it mostly adds noise; VAA therefore
ramps lambda from 0 to lam_max over training (the official code: lambda = epoch / num_epochs * lambda_max).
A schedule is any callable (step, total_steps) -> lambda; `make_schedule` builds the two used here.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

Schedule = Callable[[int, int], float]


def linear(step: int, total_steps: int, lam_max: float = 1.0) -> float:
    """lam_max * step / total_steps, clamped to [0, lam_max]: 0 at step 0, lam_max at step total_steps and after.

    `step` counts completed optimizer steps, so the last step of a run (step = total_steps - 1) uses
    lam_max * (total_steps - 1) / total_steps, the same as the official per-epoch fraction.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    return lam_max * min(max(step / total_steps, 0.0), 1.0)


def constant(lam: float) -> Schedule:
    """A schedule that is `lam` at every step (the paper's fixed-lambda ablation)."""

    def schedule(step: int, total_steps: int) -> float:
        return lam

    return schedule


def make_schedule(kind: str, lam: float) -> Schedule:
    """Build a schedule by name: 'linear' (0 -> lam over training) or 'constant' (lam throughout)."""
    if kind == "linear":
        return partial(linear, lam_max=lam)
    if kind == "constant":
        return constant(lam)
    raise ValueError(f"unknown lambda schedule {kind!r}: expected 'linear' or 'constant'")


def use_perturbed(lambda_t: float, generator: torch.Generator) -> bool:
    """The official stochastic form: True (take the perturbed step only) with probability lambda_t.

    Exactly one uniform draw per call, whatever lambda_t is, so ranks sharing a seed stay in lock-step.
    lambda_t <= 0 never perturbs and lambda_t >= 1 always does (the draw lies in [0, 1)).
    """
    return bool(torch.rand((), generator=generator).item() < lambda_t)
