"""The small engine interface an algorithm step talks to: backward, step.

LocalEngine serves one process and DDP (DDP all-reduces inside backward); DeepSpeedEngine wraps a
DeepSpeed engine (ZeRO 0-2) behind the same two methods.
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


class DeepSpeedEngine:
    """DeepSpeed ZeRO with a client torch AdamW (no fused-op compile); forward through `self.model`."""

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float = 0.0, zero_stage: int = 2) -> None:
        import deepspeed

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": zero_stage}, "zero_allow_untested_optimizer": True}
        self.model, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)

    def step(self) -> None:
        self.model.step()
