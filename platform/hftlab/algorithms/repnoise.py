"""RepNoise (Rosati et al. 2024, "Representation Noising: A Defence Mechanism Against Harmful Finetuning").

Harmful fine-tuning is cheap because the aligned model still carries the information needed to answer harmful
requests; it is only steered away from it. RepNoise removes that information: it pushes the hidden
representations of harmful answers toward Gaussian noise at every layer, so that a few harmful steps have nothing
to recover, while keeping the loss on harmless (safe) answers low. Per step, on an alignment batch and a harmful batch:

    L = L_harmless(theta) + beta * A(theta) + alpha * MMD

- L_harmless: `loss_fn` on the alignment batch (safe refusals), through `engine.model`.
- A: the bounded gradient-ascent term on the harmful answer tokens. ascent="log" (default): A = -log L_harmful,
  L_harmful the cross-entropy on the harmful response tokens: ascent whose push fades as 1 / L_harmful (what the
  official code does, as we remember it: `- beta * torch.log(harmful_loss)`). ascent="unlikelihood":
  A = mean over harmful response tokens of -log(1 - p(token)), bounded below by 0. In the brief's notation
  "- beta * L_ascent", L_ascent = -A.
- MMD: for each hidden state the model returns with `output_hidden_states=True` (the embeddings and every layer),
  the MMD between the harmful batch's representations (each sample's response positions, flattened to one vector,
  other positions zeroed) and Gaussian noise of the same shape and mask, averaged over layers. The kernel is the
  official code's (transfer-learning `MMD_loss`): a sum of 5 Gaussian kernels with bandwidths b * 2^k / 4,
  k = 0..4, b the mean pairwise squared distance (detached), biased estimate mean(XX + YY - XY - YX).

One backward on the combined loss, through `engine.model` (two forwards, harmless and harmful): about 2x SFT when
the two batches are the same size. n_backward counts the backward calls (1); n_forward = 2.

Followed: the paper's objective and the official domenicrosati/representation-noising `rep_noise_loss`, to our
best recollection, with its defaults alpha = 1 (noise) and beta = 0.001 (ascent). The official code may name the
two weights the other way round; here alpha always weights the noise term and beta the ascent term. Deviations:
- the official harmful and harmless batches are paired (same prompts; the mask is where their token ids differ);
  ours are unpaired, and the mask is the harmful batch's response tokens (labels != -100).
- the noise is drawn from this step's own generator (seeded), so a run is reproducible.
- alpha = beta = 0 is plain SFT (no harmful forward).
- pairwise distances use the Gram identity instead of the official O(n^2 d) expand (same values up to rounding,
  clamped at 0).

Distributed: everything is per rank. The MMD (its bandwidth and kernel means) is over this rank's slice of the
harmful batch, and the log term is the log of this rank's normalised harmful loss; DDP/DeepSpeed then average the
gradient. N ranks therefore approximate, not reproduce, one process; every rank draws the same noise (same seed).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from hftlab.algorithms.sft import causal_lm_loss

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]
ASCENTS = ("log", "unlikelihood")
KERNEL_MUL, KERNEL_NUM = 2.0, 5  # the official MMD_loss defaults
MIN_LOSS = 1e-8  # log(0) guard: a slice with no response tokens has a zero loss


def mmd(x: torch.Tensor, y: torch.Tensor, kernel_mul: float = KERNEL_MUL, kernel_num: int = KERNEL_NUM) -> torch.Tensor:
    """Biased multi-kernel MMD^2 between the rows of x and y (n x d each), as the official MMD_loss computes it."""
    n = x.shape[0]
    total = torch.cat([x, y]).float()
    sq = total.pow(2).sum(1)
    dist = (sq[:, None] + sq[None, :] - 2 * total @ total.T).clamp_min(0)
    m = total.shape[0]
    bandwidth = (dist.detach().sum() / (m * m - m)).clamp_min(1e-12) / kernel_mul ** (kernel_num // 2)
    kernels = sum(torch.exp(-dist / (bandwidth * kernel_mul**i)) for i in range(kernel_num))
    return (kernels[:n, :n] + kernels[n:, n:] - kernels[:n, n:] - kernels[n:, :n]).mean()


def _token_mean(per_token: torch.Tensor, mask: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Sum over response tokens / the batch's `norm` (distributed, like token_sum_loss) or the token count."""
    total = (per_token * mask).sum()
    return total / (batch["norm"] if "norm" in batch else mask.sum().clamp_min(1))


class RepNoiseStep:
    """An alignment step: step(model, batch, engine) -> stats, once per optimizer step.

    `harmful_batch()` returns the next harmful batch (harmful prompt + harmful answer, already on the device).
    Stats: loss (L_harmless), harmful_loss (L_harmful, cross-entropy), ascent (A), noise_mmd (MMD), total (L),
    n_backward (1), n_forward (2; 1 when alpha = beta = 0, the harmful stats then nan).
    """

    def __init__(self, harmful_batch: Callable[[], Batch], *, alpha: float = 1.0, beta: float = 0.001,
                 ascent: str = "log", loss_fn: LossFn = causal_lm_loss, seed: int = 0) -> None:
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got {alpha}, {beta}")
        if ascent not in ASCENTS:
            raise ValueError(f"ascent must be one of {ASCENTS}, got {ascent!r}")
        self.harmful_batch = harmful_batch
        self.alpha, self.beta, self.ascent = float(alpha), float(beta), ascent
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

    def harmful_terms(self, model: torch.nn.Module, harmful: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(L_harmful, A, MMD) on one harmful batch, from one forward with all hidden states."""
        out = model(input_ids=harmful["input_ids"], attention_mask=harmful["attention_mask"], output_hidden_states=True)
        labels = harmful["labels"]
        logp = F.log_softmax(out.logits[:, :-1].float(), dim=-1)
        target = labels[:, 1:]
        tmask = (target != -100).float()
        token_logp = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        harmful_loss = _token_mean(-token_logp, tmask, harmful)
        if self.ascent == "log":
            ascent = -torch.log(harmful_loss.clamp_min(MIN_LOSS))
        else:  # -log(1 - p), computed as -log1p(-exp(log p)) with p kept below 1
            ascent = _token_mean(-torch.log1p(-token_logp.exp().clamp_max(1 - 1e-6)), tmask, harmful)
        pmask = (labels != -100).unsqueeze(-1).float()  # the harmful answer's positions (official: where ids differ)
        gen = self._generator(out.logits.device)
        noise_mmd = torch.zeros((), device=out.logits.device)
        for hidden in out.hidden_states if self.alpha > 0 else ():  # alpha = 0: no noise term, no draws
            h = hidden.float() * pmask
            noise = torch.randn(h.shape, generator=gen, device=h.device, dtype=h.dtype) * pmask
            noise_mmd = noise_mmd + mmd(h.reshape(h.shape[0], -1), noise.reshape(h.shape[0], -1))
        return harmful_loss, ascent, noise_mmd / len(out.hidden_states)

    def __call__(self, model: torch.nn.Module, batch: Batch, engine: Any) -> dict[str, float]:
        """One RepNoise optimizer step on one alignment batch and one harmful batch (see the module docstring)."""
        loss = self.loss_fn(model, batch)
        if self.alpha == 0 and self.beta == 0:
            engine.backward(loss)
            engine.step()
            nan = math.nan
            return {"loss": loss.item(), "harmful_loss": nan, "ascent": nan, "noise_mmd": nan, "total": loss.item(),
                    "n_backward": 1, "n_forward": 1}
        harmful_loss, ascent, noise_mmd = self.harmful_terms(model, self.harmful_batch())
        total = loss + self.beta * ascent + self.alpha * noise_mmd
        engine.backward(total)
        engine.step()
        return {"loss": loss.item(), "harmful_loss": harmful_loss.item(), "ascent": ascent.item(),
                "noise_mmd": noise_mmd.item(), "total": total.item(), "n_backward": 1, "n_forward": 2}
