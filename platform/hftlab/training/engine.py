"""The small engine interface an algorithm step talks to, the same for one process, DDP and DeepSpeed ZeRO 0-2.

- `model`: what the update's forward goes through (DDP- or DeepSpeed-wrapped under Ray Train).
- `module`: the bare model, for *probe* forwards whose gradient must not reach the optimizer or DDP's reducer.
- `backward(loss)`, `step()`: accumulate the update's gradient (averaged over ranks), then apply it.
- `grad(loss)`: a probe gradient of the trainable parameters, averaged over ranks, leaving `.grad` and the
  optimizer untouched (VAA's eps, SafeGrad's alignment gradient, Booster's harmful gradient).
- `get_grads()` / `set_grads(grads)`: read and overwrite the accumulated update gradient between backward and
  step (SafeGrad's projection, VAA's weighted sum). Under ZeRO-2 the gradient lives in DeepSpeed's partitions,
  not in `p.grad`; these go through DeepSpeed's safe_get/set_full_grad.

Rank averaging relies on the losses being normalised so that the mean over ranks is the global batch's
gradient (training/trainer.py's token_sum_loss); in one process it is the identity.
"""

from __future__ import annotations

from pathlib import Path

import torch


def mean_over_ranks(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """All-reduce the tensors to their mean over ranks (one flat buffer, one collective); identity in one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset : offset + t.numel()].view_as(t).to(t.dtype))
        offset += t.numel()
    return out


class LocalEngine:
    """One process or DDP (DDP all-reduces inside backward); torch AdamW."""

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float = 0.0) -> None:
        self.model = model
        self.module = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def grad(self, loss: torch.Tensor) -> list[torch.Tensor]:
        """d loss / d params (zeros where unused), mean over ranks; `.grad` is not touched."""
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        return mean_over_ranks([torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads, strict=True)])

    def get_grads(self) -> list[torch.Tensor]:
        return [torch.zeros_like(p) if p.grad is None else p.grad for p in self.params]

    @torch.no_grad()
    def set_grads(self, grads: list[torch.Tensor]) -> None:
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g.detach().to(p.dtype).clone()

    def save(self, directory: str | Path, rank: int) -> None:
        """The optimizer state into a checkpoint directory, for an exact resume (identical on DDP ranks: rank 0 writes)."""
        if rank == 0:
            torch.save({"optimizer": self.optimizer.state_dict()}, Path(directory) / "optimizer.pt")

    def load(self, directory: str | Path) -> None:
        self.optimizer.load_state_dict(torch.load(Path(directory) / "optimizer.pt", weights_only=True)["optimizer"])


class DeepSpeedEngine(LocalEngine):
    """DeepSpeed ZeRO 0-2 with a client torch AdamW (no fused-op compile); forward through `self.model`."""

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float = 0.0, zero_stage: int = 2,
                 bf16: bool = False) -> None:
        import deepspeed

        if zero_stage not in (0, 1, 2):
            raise ValueError(f"zero_stage must be 0, 1 or 2 (stage 3 shards the weights the probes read), got {zero_stage}")
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": zero_stage}, "zero_allow_untested_optimizer": True}
        if bf16:  # GPU: bf16 weights and activations, fp32 master weights and optimizer state kept by DeepSpeed
            config["bf16"] = {"enabled": True}
        self.model, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.module = self.model.module
        self.params = [p for p in self.module.parameters() if p.requires_grad]

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)

    def step(self) -> None:
        self.model.step()

    def get_grads(self) -> list[torch.Tensor]:
        from deepspeed.utils import safe_get_full_grad

        return [g if (g := safe_get_full_grad(p)) is not None else torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def set_grads(self, grads: list[torch.Tensor]) -> None:
        from deepspeed.utils import safe_set_full_grad

        for p, g in zip(self.params, grads, strict=True):
            safe_set_full_grad(p, g.detach().float())

    def save(self, directory: str | Path, rank: int) -> None:
        """Every rank writes its partition of the optimizer state; the checkpoint directory gathers them all."""
        torch.save({"optimizer": self.optimizer.state_dict()}, Path(directory) / f"optimizer-rank{rank}.pt")

    def load(self, directory: str | Path) -> None:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        files = sorted(Path(directory).glob("optimizer-rank*.pt"), key=lambda f: int(f.stem.split("rank")[1]))
        # ZeRO's state holds these three plain DeepSpeed types besides tensors (listed by get_unsafe_globals_in_checkpoint)
        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
            states = [torch.load(f, weights_only=True)["optimizer"] for f in files]
        self.optimizer.load_state_dict(states)  # ZeRO takes every rank's partition (it may re-partition them)
