"""RepNoise (Rosati et al. 2024, "Representation Noising: A Defence Mechanism Against Harmful Finetuning").

Harmful fine-tuning is cheap because the aligned model still carries what it needs to answer harmful requests; it
is only steered away from it. RepNoise removes that information: it pushes the representations of harmful answers
toward Gaussian noise in every layer, and ascends their loss (bounded), so that a few harmful steps have nothing to
recover, while the loss on harmless answers stays low. Per step, on an alignment (harmless) batch and a harmful
batch, one backward of

    L = L_harmless + beta * MMD_noise - alpha * log(L_lens + 1)

as domenicrosati/representation-noising computes it (`rep_noise_loss`, representation_noising/loss.py:L74-L130
@ 03689ff):
- L_harmless: the cross-entropy of the harmless batch (L108-L115).
- L_lens: the harmful batch's cross-entropy of the final logits, plus that of the logit lens lm_head(norm(h)) of
  every hidden state h the model returns with output_hidden_states (the embeddings, each layer's output, and the
  already-normed last one, normed again as the reference does), the sum divided by the number of hidden states
  (L+1 for L+2 terms), then + 1 inside the log (L117-L129). The ascent's gradient fades as 1 / (L_lens + 1).
- MMD_noise: per decoder layer, the MMD between its MLP block's output (`model.layers.{i}.mlp`, before the residual
  add) under the mask and standard Gaussian noise under the same mask, each example flattened to one row; the mean
  over layers (L87-L100). The kernel is the reference's MMD_loss (L17-L49): 5 Gaussian kernels of bandwidths
  b * 2^k / 4, k = 0..4, b the mean off-diagonal squared distance (detached), biased mean(XX + YY - XY - YX).
- alpha weights the log term, beta the MMD; the reference's defaults alpha = 1, beta = 0.001 (L76, L129).

The mask (`mask`):
- "differ" (the reference, L93): the positions where the harmful and harmless token ids differ, both batches padded
  to one width; one mask for all three terms, each a masked cross-entropy as the reference's (L52-L71): the targets
  are the input ids at masked positions, a target id 0 is ignored, the logits predicting from an unmasked position
  are zeroed. With paired harmful batches (row i answers alignment row i's prompt, as the reference's refusal data)
  it selects the two answers. Unpaired, it is what the copies in git-disl/Booster and ChanLiang/VAA run (Booster
  trainer.py:L1162-L1173 @ 6421918, a fresh random harmful batch per step): nearly every token differs, prompts
  and padding included.
- "response" (default; our deliberate difference, since our harmful batches are unpaired by default): the harmful
  batch's answer tokens (labels != -100) for the ascent and the MMD, and the stage's own loss on the answer tokens
  for L_harmless.
Other differences: the noise comes from the step's own seeded generator (a run is reproducible); the MMD is in
float32; the reference never removes its hooks, ours are removed after the forward; alpha = beta = 0 is plain SFT.

Distributed: exact. The cross-entropies are token sums over the global batch's token count, L_lens is all-reduced
before the log (its gradient is each rank's share over the global L_lens + 1), and the MMD is the global batch's:
each rank gathers the others' MLP outputs (detached), draws the global batch's noise, and lets its own rows carry
W times the MMD's gradient, so DDP's average is the one-process gradient. No collective runs in the backward.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from hftlab.algorithms.collective import gather_rows, max_over_ranks, sum_over_ranks, world
from hftlab.algorithms.sft import causal_lm_loss
from hftlab.algorithms.vaccine import find_layers, hooked

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]
MASKS = ("response", "differ")
KERNEL_MUL, KERNEL_NUM = 2.0, 5  # the reference's MMD_loss defaults (loss.py:L18)


def mmd(x: torch.Tensor, y: torch.Tensor, kernel_mul: float = KERNEL_MUL, kernel_num: int = KERNEL_NUM) -> torch.Tensor:
    """Biased multi-kernel MMD^2 between the rows of x and y (n x d each), the reference's MMD_loss (loss.py:L17-L49).
    Distances by the Gram identity (same values up to rounding, clamped at 0) instead of the O(n^2 d) expand."""
    n = x.shape[0]
    total = torch.cat([x, y]).float()
    sq = total.pow(2).sum(1)
    dist = (sq[:, None] + sq[None, :] - 2 * total @ total.T).clamp_min(0)
    m = total.shape[0]
    bandwidth = (dist.detach().sum() / (m * m - m)).clamp_min(1e-12) / kernel_mul ** (kernel_num // 2)
    kernels = sum(torch.exp(-dist / (bandwidth * kernel_mul**i)) for i in range(kernel_num))
    return (kernels[:n, :n] + kernels[n:, n:] - kernels[:n, n:] - kernels[n:, :n]).mean()


def final_norm(module: torch.nn.Module) -> torch.nn.Module:
    """The final norm before lm_head (`model.norm` of a Llama/Qwen2 causal LM, also under a peft wrapper)."""
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    return base.get_decoder().norm


def pad_to(batch: Batch, width: int, pad_id: int) -> Batch:
    """Right-pad a collated batch to `width` tokens (pad ids, attention 0, labels -100)."""
    extra = width - batch["input_ids"].shape[1]
    if extra <= 0:
        return batch
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": -100}
    return {k: F.pad(v, (0, extra), value=fill[k]) if k in fill else v for k, v in batch.items()}


def real_rows(batch: Batch) -> int:
    """Rows that belong to the global batch: all but a rank's one dummy row when its slice is empty (batches.py)."""
    return int(batch["rows"]) if "rows" in batch else len(batch["input_ids"])


def take_rows(batch: Batch, n: int) -> Batch:
    """The first n rows of a batch (scalars such as `norm` kept)."""
    return {k: v[:n] if v.dim() > 0 else v for k, v in batch.items()}


class Targets:
    """What a cross-entropy is taken over: sum over weighted next-token targets / `norm` (the global count / W)."""

    def __init__(self, targets: torch.Tensor, weights: torch.Tensor, norm: torch.Tensor,
                 logit_mask: torch.Tensor | None = None) -> None:
        self.targets, self.weights, self.norm, self.logit_mask = targets.clamp_min(0), weights, norm, logit_mask

    @classmethod
    def response(cls, batch: Batch) -> Targets:
        """The answer tokens (labels != -100), normalised by the batch's `norm` (distributed) or its token count."""
        target = batch["labels"][:, 1:]
        weights = (target != -100).float()
        norm = batch["norm"] if "norm" in batch else weights.sum().clamp_min(1)
        return cls(target, weights, norm)

    @classmethod
    def differ(cls, input_ids: torch.Tensor, mask: torch.Tensor) -> Targets:
        """The reference's masked_token_ce_loss (loss.py:L52-L71): targets ids * mask[1:], 0 ignored, logits * mask[:-1]."""
        target = input_ids[:, 1:] * mask[:, 1:].long()
        weights = (target != 0).float()
        _, n = world()
        norm = (sum_over_ranks(weights.sum()) / n).clamp_min(1 / n)  # the mean over the global batch's targets
        return cls(target, weights, norm, mask[:, :-1, None].float())

    def ce(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits[:, :-1].float()
        if self.logit_mask is not None:
            logits = logits * self.logit_mask
        nll = -F.log_softmax(logits, dim=-1).gather(-1, self.targets.unsqueeze(-1)).squeeze(-1)
        return (nll * self.weights).sum() / self.norm


class RepNoiseStep:
    """An alignment step: step(model, batch, engine) -> stats, once per optimizer step.

    `harmful_batch()` returns the next harmful batch (harmful prompt + harmful answer, on the device; with
    mask="differ" and paired data, row i answers `batch` row i's prompt). `pad_id` pads the two batches to one width.
    Stats: loss (L_harmless), harmful_loss (final-logit cross-entropy), lens_loss (L_lens), ascent (-log(L_lens + 1)),
    noise_mmd, total (L), n_backward (1), n_forward (2; 1 when alpha = beta = 0, the harmful stats then nan).
    """

    def __init__(self, harmful_batch: Callable[[], Batch], *, alpha: float = 1.0, beta: float = 0.001,
                 mask: str = "response", pad_id: int = 0, loss_fn: LossFn = causal_lm_loss, seed: int = 0) -> None:
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got {alpha}, {beta}")
        if mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
        self.harmful_batch = harmful_batch
        self.alpha, self.beta, self.mask, self.pad_id = float(alpha), float(beta), mask, pad_id
        self.loss_fn = loss_fn
        self.seed = seed
        self.generators: dict[torch.device, torch.Generator] = {}
        self.pending: dict[str, torch.Tensor] = {}  # generator states loaded before their device is known

    def _generator(self, device: torch.device) -> torch.Generator:
        """The noise generator for `device`, created on first use (seeded, or resumed from `load_state_dict`)."""
        if device not in self.generators:
            gen = torch.Generator(device=device).manual_seed(self.seed)
            if str(device) in self.pending:
                gen.set_state(self.pending.pop(str(device)))
            self.generators[device] = gen
        return self.generators[device]

    def state_dict(self) -> dict[str, Any]:
        """The noise generators' states: a resumed run draws the same noise it would have drawn."""
        return {"generators": {str(d): g.get_state() for d, g in self.generators.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generators, self.pending = {}, dict(state["generators"])

    def noise_mmd(self, activations: list[torch.Tensor], mask: torch.Tensor, rows: int) -> torch.Tensor:
        """Mean over layers of MMD(activation * mask, N(0, I) * mask) over the global batch (see the module docstring).

        `rows`: this rank's real rows (a rank whose slice of a short batch is empty holds one all-masked dummy row).
        """
        rank, n_ranks = world()
        device = mask.device
        width = max_over_ranks(mask.shape[1], device)
        own_mask = F.pad(mask[:rows].float(), (0, width - mask.shape[1]))
        masks, sizes = gather_rows(own_mask)
        offset = sum(sizes[:rank])
        order = [r + j * n_ranks for r, count in enumerate(sizes) for j in range(count)]  # rank r's j-th = global r + jW
        gen = self._generator(device)
        total = torch.zeros((), device=device)
        for act in activations:
            x = F.pad(act[:rows].float() * own_mask[:, : act.shape[1], None], (0, 0, 0, width - act.shape[1]))
            x = x.reshape(rows, -1)
            others, _ = gather_rows(x)
            xs = torch.cat([others[:offset], x, others[offset + rows:]]) if n_ranks > 1 else x
            noise = torch.randn((len(order), width, act.shape[-1]), generator=gen, device=device, dtype=torch.float32)
            ys = (noise[order] * masks[:, :, None]).reshape(len(order), -1)
            value = mmd(xs, ys)
            total = total + (n_ranks * (value - value.detach()) + value.detach() if n_ranks > 1 else value)
        return total / len(activations)

    def __call__(self, model: torch.nn.Module, batch: Batch, engine: Any) -> dict[str, float]:
        """One RepNoise optimizer step on one alignment batch and one harmful batch (see the module docstring)."""
        if self.alpha == 0 and self.beta == 0:
            loss = self.loss_fn(model, batch)
            engine.backward(loss)
            engine.step()
            nan = math.nan
            return {"loss": loss.item(), "harmful_loss": nan, "lens_loss": nan, "ascent": nan, "noise_mmd": nan,
                    "total": loss.item(), "n_backward": 1, "n_forward": 1}
        harmful = self.harmful_batch()
        rows = real_rows(harmful)
        if self.mask == "differ":  # the reference's mask (loss.py:L93), both batches padded to one width
            n = min(len(harmful["input_ids"]), len(batch["input_ids"]))  # unpaired batches may differ in rows
            width = max(harmful["input_ids"].shape[1], batch["input_ids"].shape[1])
            harmful, harmless = (pad_to(take_rows(b, n), width, self.pad_id) for b in (harmful, batch))
            rows = min(rows, real_rows(batch), n)
            mask = harmful["input_ids"] != harmless["input_ids"]
            mask[rows:] = False  # a rank's dummy row (an empty slice of a short batch) takes no part
            out = model(input_ids=harmless["input_ids"], attention_mask=harmless["attention_mask"])
            loss = Targets.differ(harmless["input_ids"], mask).ce(out.logits)
            targets = Targets.differ(harmful["input_ids"], mask)
        else:
            loss = self.loss_fn(model, batch)
            mask = harmful["labels"] != -100
            targets = Targets.response(harmful)

        module = engine.module
        mlps = [layer.mlp for layer in find_layers(module, "DecoderLayer")]
        acts: dict[torch.nn.Module, torch.Tensor] = {}
        with hooked(mlps, lambda m, _i, out: acts.setdefault(m, out)):  # first call only (checkpointed reruns)
            out = model(input_ids=harmful["input_ids"], attention_mask=harmful["attention_mask"],
                        output_hidden_states=True)
        noise = self.noise_mmd([acts[m] for m in mlps], mask, rows) if self.beta > 0 else torch.zeros(())
        harmful_loss = targets.ce(out.logits)
        head, norm = module.get_output_embeddings(), final_norm(module)
        lens = harmful_loss + sum(targets.ce(head(norm(h))) for h in out.hidden_states)
        lens = lens / len(out.hidden_states)  # this rank's share of L_lens
        _, n_ranks = world()
        lens_global = sum_over_ranks(lens.detach()) / n_ranks
        ascent = -torch.log(lens - lens.detach() + lens_global + 1)  # value: the global L_lens; gradient: this share
        total = loss + self.beta * noise.to(loss.device) + self.alpha * ascent
        engine.backward(total)
        engine.step()
        return {"loss": loss.item(), "harmful_loss": harmful_loss.item(), "lens_loss": lens_global.item(),
                "ascent": ascent.item(), "noise_mmd": noise.item(), "total": total.item(), "n_backward": 1,
                "n_forward": 2}
