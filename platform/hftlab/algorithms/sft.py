"""Plain supervised fine-tuning: the baseline every other method is measured against."""

from __future__ import annotations

import torch


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean token cross-entropy on the response tokens (labels are -100 elsewhere)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def sft_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], engine, loss_fn=causal_lm_loss) -> dict[str, float]:
    """One optimizer step on one batch; `engine` owns backward and the optimizer (see training/engine.py)."""
    loss = loss_fn(model, batch)
    engine.backward(loss)
    engine.step()
    return {"loss": loss.item(), "n_backward": 1}
