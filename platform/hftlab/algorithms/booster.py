"""Booster (Huang et al., "Booster: Tackling Harmful Fine-tuning for LLMs via Attenuating Harmful Perturbation").

Harmful fine-tuning works because one gradient step on harmful data lowers the harmful loss a lot. Booster aligns
the model so that such a step achieves little: it adds to the alignment loss a regulariser, the drop of the harmful
loss after one normalised harmful step,

    L(theta) = L_align(theta) + lam * (L_harm(theta) - L_harm(theta - alpha * g_h / ||g_h||)),   g_h = grad L_harm(theta).

Its gradient is taken as in the official code (first order: the Jacobian of the inner step is dropped), so each
step computes three gradients on two batches:

1. g_h  = grad L_harm at theta                      (probe, `engine.grad`)
2. g_h' = grad L_harm at theta - alpha g_h/||g_h||  (probe, `engine.grad`; theta restored bit-for-bit after)
3. g_a  = grad L_align at theta, through `engine.model`, in the step's single `engine.backward`, with
   d = lam * (g_h - g_h') added by the surrogate sum_p <p, d_p> (d detached), so the update gradient is
   g_a + lam * (g_h - g_h') in one backward: no get/set of the accumulated gradient is needed (cheap under ZeRO).

Cost: three backward passes, about 3x SFT (the two probes are on the harmful batch).

Followed: git-disl/Booster `BoosterAlignmentTrainer.training_step` (stored_grads = g_h, param -= alpha g_h /
(||g_h|| + 1e-7), perturb_grads = g_h', restore, alignment backward, grad += lamb * stored - lamb * perturb), and
its defaults lamb = 5, alpha = 0.1 as we remember the scripts/paper. Deviations:
- the official code restores theta with `+= alpha g / norm`, which drifts by rounding; we copy the saved weights
  back (perturbation.perturbed), so theta is exactly what it was.
- no 1e-7 in the normalisation: a zero harmful gradient gives no perturbation (and g_h - g_h' = 0) instead.
- lam = 0 or alpha = 0 make the regulariser's gradient exactly 0: the step is then plain SFT, one backward.

Distributed: g_h and g_h' come from `engine.grad`, averaged over ranks, so the harmful perturbation, ||g_h|| and
d are identical on every rank; with token-sum-normalised losses (training/trainer.py) N ranks reproduce one process.
The harmful batches are each rank's slice of a global harmful batch (`harmful_batch()` is called once per step).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hftlab.algorithms.perturbation import compute_eps, global_norm, perturbed
from hftlab.algorithms.sft import causal_lm_loss

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]


def surrogate(params: list[torch.Tensor], direction: list[torch.Tensor]) -> torch.Tensor:
    """sum_p <p, d_p> with d detached: adding it to a loss adds exactly d to that loss's parameter gradient."""
    terms = [(p * d.detach().to(p.dtype)).sum() for p, d in zip(params, direction, strict=True)]
    return sum(terms[1:], terms[0])


class BoosterStep:
    """An alignment step: step(model, batch, engine) -> stats, once per optimizer step.

    `harmful_batch()` returns the next harmful batch (harmful prompt + harmful answer, already on the device).
    Stats: loss (alignment loss at theta), harmful_loss (at theta), perturbed_harmful_loss (after the normalised
    harmful step), harmful_drop (their difference: what Booster drives down), harmful_grad_norm, n_backward (3; 1 when
    lam or alpha is 0, and the harmful stats are then nan).
    """

    def __init__(self, harmful_batch: Callable[[], Batch], *, lam: float = 5.0, alpha: float = 0.1,
                 loss_fn: LossFn = causal_lm_loss) -> None:
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.harmful_batch = harmful_batch
        self.lam = float(lam)
        self.alpha = float(alpha)
        self.loss_fn = loss_fn

    def regulariser_grad(self, engine: Any) -> tuple[list[torch.Tensor], dict[str, float]]:
        """d = lam * (g_h - g_h') from two probes on one harmful batch, and the harmful stats."""
        harmful = self.harmful_batch()
        h = self.loss_fn(engine.module, harmful)
        g_h = engine.grad(h)
        norm = global_norm(g_h)
        with perturbed(engine.params, compute_eps(g_h, -self.alpha)):  # theta - alpha * g_h / ||g_h||
            h_p = self.loss_fn(engine.module, harmful)
            g_hp = engine.grad(h_p)
        d = [self.lam * (a - b) for a, b in zip(g_h, g_hp, strict=True)]
        h, h_p = h.item(), h_p.item()
        return d, {"harmful_loss": h, "perturbed_harmful_loss": h_p, "harmful_drop": h - h_p,
                   "harmful_grad_norm": norm.item()}

    def __call__(self, model: torch.nn.Module, batch: Batch, engine: Any) -> dict[str, float]:
        """One Booster optimizer step on one alignment batch and one harmful batch (see the module docstring)."""
        if self.lam == 0 or self.alpha == 0:
            loss = self.loss_fn(model, batch)
            engine.backward(loss)
            engine.step()
            nan = float("nan")
            return {"loss": loss.item(), "harmful_loss": nan, "perturbed_harmful_loss": nan, "harmful_drop": nan,
                    "harmful_grad_norm": nan, "n_backward": 1}
        d, stats = self.regulariser_grad(engine)
        loss = self.loss_fn(model, batch)
        engine.backward(loss + surrogate(engine.params, d).to(loss.device))
        engine.step()
        return {"loss": loss.item(), **stats, "n_backward": 3}
