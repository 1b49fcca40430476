"""Lisa (Huang et al. 2024, "Lazy Safety Alignment for Large Language Models against Harmful Fine-tuning").

A fine-tuning-stage defense run by the fine-tuning service: it holds some alignment data and interleaves it with the
user's data, so the model is re-aligned while it is fine-tuned. Plain alternation drifts away from both optima
("excess drift"); Lisa pulls each phase toward where the other phase left the weights with a proximal term.

As git-disl/Lisa runs it (`LisaTrainer`, trainer.py:L40-L209 @ 68e3659; the same code is Booster's ADMMTrainer):
- phases (`check_mode`, L137-L158): training starts in an alignment phase (L79-L82) and cycles `alignment_steps`
  steps on alignment batches, then `finetune_steps` steps on the user's batches. During an alignment step the
  user's batch is drawn and thrown away (L148), so a run sees about finetune / (alignment + finetune) of its data.
- anchors (`switch_model`, L109-L122, called after the phase flips): on entering fine-tuning, theta is stored as the
  alignment anchor; on entering alignment, as the fine-tuning anchor. Both start as the initial weights (L86-L89).
- loss (L176-L193): the batch's cross-entropy + rho / 2 * sum_p ||p - anchor_p||^2 over the trainable parameters,
  the anchor being the *other* phase's (alignment phase: the fine-tuning anchor; fine-tuning phase: the alignment
  anchor). The repository's README snippet names them the other way round; the code is followed.
- no proximal term while steps <= 10% of the run's steps (L182-L183, L188; `proximal_from` = that count).
Defaults as its script/finetune/lisa_poison_ratio.sh (L17-L23): rho 1, 100 alignment and 900 fine-tuning steps.

One backward per step, the cost of plain fine-tuning (the alignment steps replace user steps, they add none).

Distributed: exact. Every rank holds the same weights, so the same anchors; each adds the same proximal term to its
token-sum-normalised loss, and DDP's average of the gradients is the one-process gradient. The alignment batches
are each rank's slice of a global batch (`align_batch()` is called once per alignment step).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from hftlab.algorithms.sft import causal_lm_loss

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]


class LisaStep:
    """A fine-tuning step: step(model, user_batch, engine) -> stats, once per optimizer step.

    `align_batch()` returns the next alignment batch (on the device); `params` are the trainable parameters (the
    engine's). Stats: loss (cross-entropy of the batch trained on), phase (1 alignment, 0 fine-tuning), proximal
    (sum ||p - anchor||^2, nan while it is off), n_backward (1).
    """

    def __init__(self, align_batch: Callable[[], Batch], params: Sequence[torch.Tensor], *, rho: float = 1.0,
                 alignment_steps: int = 100, finetune_steps: int = 900, proximal_from: float = 0.0,
                 loss_fn: LossFn = causal_lm_loss) -> None:
        if rho < 0 or alignment_steps < 0 or finetune_steps < 1:
            raise ValueError(f"need rho >= 0, alignment_steps >= 0, finetune_steps >= 1; got {rho}, "
                             f"{alignment_steps}, {finetune_steps}")
        self.align_batch, self.params = align_batch, list(params)
        self.rho, self.alignment_steps, self.finetune_steps = float(rho), alignment_steps, finetune_steps
        self.proximal_from, self.loss_fn = proximal_from, loss_fn
        self.aligning = alignment_steps > 0
        self.alignment_anchor = [p.detach().clone() for p in self.params]
        self.finetune_anchor = [p.detach().clone() for p in self.params]
        self.clock = self.steps = 0

    @torch.no_grad()
    def _next_phase(self) -> None:
        """Flip the phase when the current one has run its steps; the weights now anchor the phase that ends."""
        if self.steps == 0:
            return
        if self.aligning and self.clock % self.alignment_steps == 0:
            self.aligning = False
            anchor = self.alignment_anchor
        elif not self.aligning and self.alignment_steps > 0 and self.clock % self.finetune_steps == 0:
            self.aligning = True
            anchor = self.finetune_anchor
        else:
            return
        for a, p in zip(anchor, self.params, strict=True):
            a.copy_(p.detach())
        self.clock = 0

    def __call__(self, model: torch.nn.Module, batch: Batch, engine: Any) -> dict[str, float]:
        """One Lisa optimizer step: an alignment batch or the user's `batch`, plus the proximal term."""
        self._next_phase()
        loss = self.loss_fn(model, self.align_batch() if self.aligning else batch)
        total, proximal = loss, math.nan
        if self.rho > 0 and self.steps > self.proximal_from:
            anchor = self.finetune_anchor if self.aligning else self.alignment_anchor
            prox = sum((p - a).pow(2).sum() for p, a in zip(self.params, anchor, strict=True))
            total = loss + self.rho / 2 * prox.to(loss.device)
            proximal = prox.item()
        engine.backward(total)
        engine.step()
        stats = {"loss": loss.item(), "phase": float(self.aligning), "proximal": proximal, "n_backward": 1}
        self.steps += 1
        self.clock += 1
        return stats

    def state_dict(self) -> dict[str, Any]:
        """Phase, clocks and both anchors: a resumed run switches and pulls exactly as the unbroken one."""
        return {"aligning": self.aligning, "clock": self.clock, "steps": self.steps,
                "alignment_anchor": self.alignment_anchor, "finetune_anchor": self.finetune_anchor}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.aligning, self.clock, self.steps = bool(state["aligning"]), int(state["clock"]), int(state["steps"])
        for name in ("alignment_anchor", "finetune_anchor"):
            for a, saved in zip(getattr(self, name), state[name], strict=True):
                a.copy_(saved)
