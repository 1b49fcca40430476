"""The small engine interface an algorithm step talks to: backward, step.

This is the single-process engine; a DeepSpeed or DDP engine implements the same two methods.
"""

from __future__ import annotations

import torch


class LocalEngine:
    """One process, torch AdamW."""

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float = 0.0) -> None:
        self.model = model
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
