"""SafeGrad: fine-tuning whose user-task gradient may not undo alignment (gradient surgery, see projection.py).

Each step: the alignment gradient g_a (on a batch of alignment data, recomputed every `cadence` steps and reused in
between), the user-task gradient g_u on the user's batch; if they conflict, g_u is projected on the plane orthogonal
to g_a; the applied gradient is that plus rho * g_a (rho may be 0). Cost: one extra backward every `cadence` steps,
so about 2x plain fine-tuning at cadence 1 and 1.25x at cadence 4.

Alignment loss, from config:
- "kl": KL(P_aligned || P_theta) over the alignment batch's response tokens, against the frozen aligned model (the
  paper's choice). The reference is a callable returning the aligned model's log-probabilities at those tokens
  (`response_logprobs`): computed once for the fixed alignment set (`CachedReference`), or per probe from the same
  weights with the LoRA adapter disabled, or from a frozen copy. At theta = aligned the KL is 0, and so is its
  gradient: SafeGrad then projects against nothing until fine-tuning has moved the model.
- "ce": cross-entropy on the safe responses, which has a gradient from the first step.

g_a comes from the engine's probe (`engine.grad`, averaged over ranks), g_u from the update's backward
(`engine.get_grads`), so every rank computes the same dot products and writes the same gradient back.

Followed: the paper (Yi et al. 2025, "Gradient Surgery for Safe LLM Fine-Tuning", arXiv 2508.07172): projection on
conflict, KL to the aligned model. Its code is announced at an anonymous mirror that could not be retrieved, and no
public repository holds it, so how the projected gradient and g_a are combined (`rho`) and the cadence are ours.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F

from hftlab.algorithms.projection import cosine, project
from hftlab.algorithms.sft import causal_lm_loss

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]
ALIGN_LOSSES = ("kl", "ce")


def response_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log P(. | prefix) at the response tokens (labels != -100, next-token aligned), rows then positions: [N, V]."""
    return F.log_softmax(logits[:, :-1][labels[:, 1:] != -100].float(), dim=-1)


def kl_to_reference(logits: torch.Tensor, ref_logp: torch.Tensor, labels: torch.Tensor,
                    norm: torch.Tensor | float | None = None) -> torch.Tensor:
    """KL(P_ref || P_theta) summed over response tokens, divided by `norm` (the batch's token count when None; the
    distributed normaliser otherwise, like token_sum_loss). `ref_logp`: the reference's `response_logprobs`."""
    logp = response_logprobs(logits, labels)
    per_token = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    count = (labels[:, 1:] != -100).sum()
    return per_token.sum() / (count.clamp(min=1) if norm is None else norm)


class CachedReference:
    """The reference's `response_logprobs` of a fixed set of alignment examples, computed once and then looked up.

    SafeGrad's alignment pairs are a fixed set, so the aligned model's answer distributions never change: one pass at
    the start replaces a reference forward per probe. Rows are keyed by their token ids (without padding; right
    padding does not change a causal LM's logits), so any batch of these examples, in any order or slice, is served.
    Memory: answer tokens x vocabulary floats.
    """

    def __init__(self, logits_fn: Callable[[Batch], torch.Tensor], batches: Iterable[Batch]) -> None:
        self.cache: dict[tuple[int, ...], torch.Tensor] = {}
        with torch.no_grad():
            for batch in batches:
                logits = logits_fn(batch)
                for r in range(batch["input_ids"].shape[0]):
                    keep = batch["labels"][r : r + 1, 1:] != -100
                    self.cache[self.key(batch, r)] = F.log_softmax(logits[r : r + 1, :-1][keep].float(), dim=-1)

    @staticmethod
    def key(batch: Batch, row: int) -> tuple[int, ...]:
        return tuple(batch["input_ids"][row, : int(batch["attention_mask"][row].sum())].tolist())

    def __call__(self, batch: Batch) -> torch.Tensor:
        parts = []
        for r in range(batch["input_ids"].shape[0]):
            n = int((batch["labels"][r, 1:] != -100).sum())
            if n:  # a row without response tokens (a rank's dummy slice) has nothing to look up
                cached = self.cache[self.key(batch, r)]
                if cached.shape[0] != n:
                    raise ValueError(f"cached reference has {cached.shape[0]} response tokens for a row with {n}")
                parts.append(cached)
        return torch.cat(parts) if parts else next(iter(self.cache.values()))[:0]


class SafeGradStep:
    """A stateful fine-tuning step: step(model, batch, engine) -> stats.

    Stats: loss (user task), align_loss (nan on steps that reuse g_a), conflict (0/1 globally, the share of tensors
    per tensor), cos_before / cos_after (cos(g_u, g_a) before and after projection), n_backward.
    """

    def __init__(
        self,
        align_batch: Callable[[], Batch],
        *,
        align_loss: str = "kl",
        reference: Callable[[Batch], torch.Tensor] | None = None,
        mode: str = "global",
        rho: float = 0.0,
        cadence: int = 1,
        loss_fn: LossFn = causal_lm_loss,
    ) -> None:
        if align_loss not in ALIGN_LOSSES:
            raise ValueError(f"align_loss must be one of {ALIGN_LOSSES}, got {align_loss!r}")
        if align_loss == "kl" and reference is None:
            raise ValueError("align_loss='kl' needs a reference (the aligned model's response log-probabilities)")
        if cadence < 1:
            raise ValueError(f"cadence must be >= 1, got {cadence}")
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        self.align_batch, self.align_loss_kind, self.reference = align_batch, align_loss, reference
        self.mode, self.rho, self.cadence, self.loss_fn = mode, float(rho), cadence, loss_fn
        self.g_a: list[torch.Tensor] | None = None
        self.steps_done = 0

    def alignment_loss(self, module: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """The configured alignment loss of `module` on an alignment batch."""
        if self.align_loss_kind == "ce":
            return self.loss_fn(module, batch)
        with torch.no_grad():
            ref = self.reference(batch)
        logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return kl_to_reference(logits, ref, batch["labels"], batch.get("norm"))

    def __call__(self, model: torch.nn.Module, batch: Batch, engine: Any) -> dict[str, float]:
        n_backward, align_loss = 0, math.nan
        if self.g_a is None or self.steps_done % self.cadence == 0:
            a_loss = self.alignment_loss(engine.module, self.align_batch())  # probe: reaches no optimizer
            self.g_a = [g.detach() for g in engine.grad(a_loss)]
            n_backward, align_loss = 1, a_loss.item()
        loss = self.loss_fn(model, batch)
        engine.backward(loss)
        g_u = engine.get_grads()
        g, conflict = project(g_u, self.g_a, self.mode)
        if self.rho > 0:
            g = [x + self.rho * a for x, a in zip(g, self.g_a, strict=True)]
        if conflict > 0 or self.rho > 0:  # otherwise the accumulated gradient is left exactly as it is
            engine.set_grads(g)
        stats = {"loss": loss.item(), "align_loss": align_loss, "conflict": conflict,
                 "cos_before": cosine(g_u, self.g_a), "cos_after": cosine(g, self.g_a), "n_backward": n_backward + 1}
        engine.step()
        self.steps_done += 1
        return stats

    def state_dict(self) -> dict[str, Any]:
        """Steps taken and the cached alignment gradient: a resumed run reuses it exactly as the original would."""
        return {"steps_done": self.steps_done, "g_a": self.g_a}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_done, self.g_a = int(state["steps_done"]), state["g_a"]
