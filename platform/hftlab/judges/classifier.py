"""The trained judge's network: the first `layers` decoder layers of a small LM, its top ones and a head trained.

Why cut it: on a CPU, back-propagating through all 30 layers of even a 135M model costs minutes per few hundred rows.
The lower layers stay frozen, so their output for a training row never changes: it is computed once (`lower`), and
each epoch runs only the trained top layers (`upper`) on it. The layers above `layers` are dropped to save their cost
(the default 24 of 30 was not compared with all 30 in a measured run: docs/judges.md lists what was measured).

The head reads the final norm of the last token's state and of the mean over the row's tokens, and predicts one
logit for "unsafe" plus one per harm category (an auxiliary multi-label target: the categories say *why* a row is
unsafe). It starts as a linear probe (`fit_probe`: L2-regularised logistic regression on standardised features, which
a randomly initialised head fine-tuned with the layers did not reach here) and is then fine-tuned with the layers.
Pure PyTorch over the model's own modules (a Llama-family decoder: embed_tokens, layers, norm, rotary_emb).
"""

from __future__ import annotations

import torch
from torch import nn


def causal_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, 1, T, T) additive mask: a token sees itself and earlier non-pad tokens (right padding)."""
    t = mask.shape[1]
    allowed = torch.ones(t, t, dtype=torch.bool, device=mask.device).tril()[None, None] & mask.bool()[:, None, None, :]
    allowed = allowed | torch.eye(t, dtype=torch.bool, device=mask.device)[None, None]  # pad rows see themselves: no NaN
    return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(~allowed, torch.finfo(dtype).min)


class JudgeNet(nn.Module):
    """Decoder layers [0, split) frozen, [split, layers) + the final norm + the head trained; layers above `layers`
    unused. `forward(ids, mask)` gives (batch, 1 + categories) logits."""

    def __init__(self, decoder: nn.Module, split: int, n_categories: int, layers: int | None = None) -> None:
        super().__init__()
        self.decoder = decoder  # e.g. LlamaForCausalLM.model: embed_tokens, layers, norm, rotary_emb
        total = len(decoder.layers)
        self.layers = total if layers is None else layers
        if not 1 <= self.layers <= total:
            raise ValueError(f"layers must be in [1, {total}], got {layers}")
        if not 0 <= split <= self.layers:
            raise ValueError(f"split must be in [0, {self.layers}], got {split}")
        self.split = split
        self.head = nn.Linear(2 * decoder.embed_tokens.embedding_dim, 1 + n_categories)
        for p in self.decoder.parameters():
            p.requires_grad_(False)
        for layer in self.decoder.layers[split : self.layers]:
            for p in layer.parameters():
                p.requires_grad_(True)
        for p in self.decoder.norm.parameters():
            p.requires_grad_(split < self.layers)

    def _run(self, hidden: torch.Tensor, mask: torch.Tensor, layers) -> torch.Tensor:
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None].expand(hidden.shape[0], -1)
        rope = self.decoder.rotary_emb(hidden, position_ids=positions)
        attn = causal_mask(mask, hidden.dtype)
        for layer in layers:
            hidden = layer(hidden, attention_mask=attn, position_ids=positions, position_embeddings=rope)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return hidden

    @torch.no_grad()
    def lower(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The frozen layers' output (the residual stream entering layer `split`)."""
        return self._run(self.decoder.embed_tokens(ids), mask, self.decoder.layers[: self.split])

    def features(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """What the head reads, from the residual stream at `split`: the trained layers, the final norm, then the
        mean over the row's tokens and the last token's state, side by side."""
        hidden = self.decoder.norm(self._run(hidden, mask, self.decoder.layers[self.split : self.layers]))
        m = mask.to(hidden.dtype)[..., None]
        mean = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), mask.sum(1).clamp(min=1) - 1]
        return torch.cat([mean, last], dim=-1)

    def upper(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits from the residual stream at layer `split`."""
        return self.head(self.features(hidden, mask))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.upper(self.lower(ids, mask), mask)

    def trained_state(self) -> dict[str, torch.Tensor]:
        """Only what training changed (the top layers, the norm, the head): what the cache stores."""
        keep = {n for n, p in self.named_parameters() if p.requires_grad}
        return {n: t.detach().clone() for n, t in self.state_dict().items() if n in keep}


def fit_probe(head: nn.Linear, features: torch.Tensor, targets: torch.Tensor, l2: float, aux_weight: float,
              max_iter: int = 300) -> None:
    """Set `head` to the L2-regularised logistic regression of `targets` (column 0: unsafe; the rest: categories,
    weighted by aux_weight) on standardised `features` (LBFGS), with the standardisation folded into its weights."""
    mu, sd = features.mean(0), features.std(0) + 1e-6
    x = (features - mu) / sd
    w = torch.zeros(x.shape[1], targets.shape[1], requires_grad=True)
    b = torch.zeros(targets.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")
    bce = nn.functional.binary_cross_entropy_with_logits

    def closure() -> torch.Tensor:
        opt.zero_grad()
        z = x @ w + b
        loss = bce(z[:, 0], targets[:, 0]) + aux_weight * bce(z[:, 1:], targets[:, 1:]) + l2 * (w**2).sum() / 2
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        head.weight.copy_((w / sd[:, None]).T.to(head.weight))
        head.bias.copy_((b - (mu / sd) @ w).to(head.bias))
