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

As git-disl/Booster runs it (`BoosterAlignmentTrainer.training_step`, trainer.py:L272-L389 @ 6421918, the path
without --perturb_aware, L359-L386): g_h from the harmful batch (L280-L291), theta -= alpha g_h / (||g_h|| + 1e-7)
(L294-L300), g_h' at the perturbed weights (L303-L313), theta restored (L316-L319), the alignment backward and
grad += lamb * g_h - lamb * g_h' (L364-L375). Defaults lam = 5, alpha = 0.1 (script/alignment/smooth_align.sh:
L14-L15); the harmful batch is a fresh random batch per step, 10 rows (L146-L180; `align.booster.harmful_batch_size`,
null = the stage's batch size, which is 10 in that script too). Deviations:
- the reference restores theta with `+= alpha g / norm`, which drifts by rounding; we copy the saved weights
  back (perturbation.perturbed), so theta is exactly what it was.
- a zero harmful gradient gives no perturbation (g_h - g_h' = 0) instead of 0 / 1e-7.
- lam = 0 or alpha = 0 make the regulariser's gradient exactly 0: the step is then plain SFT, one backward.
- ChanLiang/VAA's copy of Booster (trainer.py:L1048-L1068 @ e00cbf4) perturbs with + alpha g / ||g|| and never
  restores theta; that is not what this file computes.

Distributed: g_h and g_h' come from `engine.grad`, averaged over ranks, so the harmful perturbation, ||g_h|| and
d are identical on every rank; with token-sum-normalised losses (training/worker.py) N ranks reproduce one process.
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
NORM_EPS = 1e-7  # the reference's `grad_norm = self._grad_norm(stored_grads) + 1e-7` (trainer.py:L295)


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
        with perturbed(engine.params, compute_eps(g_h, -self.alpha, NORM_EPS)):  # theta - alpha g_h / (||g_h|| + 1e-7)
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
