"""The trained judge's network: a decoder LM cut in two, its top layers and a small head trained as a classifier.

Why cut it: on a CPU, back-propagating through all 30 layers of even a 135M model costs minutes per few hundred rows.
The lower layers stay frozen, so their output for a training row never changes: it is computed once (`lower`), and
each epoch runs only the trained top layers (`upper`) on it. At judging time `forward` runs both halves.

The head reads the last token's state and the mean over the row's tokens, and predicts one logit for "unsafe"
plus one per harm category (an auxiliary multi-label target: the categories say *why* a row is unsafe).
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
    """Decoder layers [0, split) frozen, [split, L) and the head trained; `forward` gives (batch, 1 + categories) logits."""

    def __init__(self, decoder: nn.Module, split: int, n_categories: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.decoder = decoder  # e.g. LlamaForCausalLM.model: embed_tokens, layers, norm, rotary_emb
        n_layers = len(decoder.layers)
        if not 0 <= split <= n_layers:
            raise ValueError(f"split must be in [0, {n_layers}], got {split}")
        self.split = split
        hidden = decoder.embed_tokens.embedding_dim
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(2 * hidden, 1 + n_categories)
        for p in self.decoder.parameters():
            p.requires_grad_(False)
        for layer in self.decoder.layers[split:]:
            for p in layer.parameters():
                p.requires_grad_(True)
        for p in self.decoder.norm.parameters():
            p.requires_grad_(split < n_layers)

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

    def upper(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits from the residual stream at layer `split`: the trained layers, the final norm, pooling, the head."""
        hidden = self.decoder.norm(self._run(hidden, mask, self.decoder.layers[self.split :]))
        m = mask.to(hidden.dtype)[..., None]
        mean = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), mask.sum(1).clamp(min=1) - 1]
        return self.head(self.dropout(torch.cat([mean, last], dim=-1)))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.upper(self.lower(ids, mask), mask)

    def trained_state(self) -> dict[str, torch.Tensor]:
        """Only what training changed (the top layers, the norm, the head): what the cache stores."""
        keep = {n for n, p in self.named_parameters() if p.requires_grad}
        return {n: t.detach().clone() for n, t in self.state_dict().items() if n in keep}
