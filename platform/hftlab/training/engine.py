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
gradient (training/worker.py's token_sum_loss); in one process it is the identity.

The optimizer step follows a stage's `Recipe`, as the HF Trainer every reference trains with does it: AdamW with
weight decay on all but biases and norm weights, the update gradient clipped to `max_grad_norm` (global L2 norm,
after any edit by set_grads), and the learning rate of HF's constant / linear / cosine schedules with warmup.
The schedule is a function of the steps taken, which `save`/`load` carry, so a resumed run continues it exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class Recipe:
    """A stage's optimizer settings (config/stages.py); `total_steps` sizes the schedule."""

    lr: float
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    lr_scheduler: str = "constant"
    warmup_ratio: float = 0.0
    total_steps: int = 1

    @classmethod
    def of(cls, stage, total_steps: int) -> Recipe:
        """The recipe of an AlignConfig / FinetuneConfig for a run of `total_steps` optimizer steps."""
        return cls(stage.lr, stage.weight_decay, stage.max_grad_norm, stage.lr_scheduler, stage.warmup_ratio,
                   max(total_steps, 1))

    def factor(self, step: int) -> float:
        """lr multiplier for the optimizer step after `step` steps, as HF's get_{constant,linear,cosine}_schedule
        _with_warmup (warmup = ceil(warmup_ratio * total), HF's get_warmup_steps)."""
        if self.lr_scheduler not in SCHEDULES:
            raise ValueError(f"lr_scheduler must be one of {SCHEDULES}, got {self.lr_scheduler!r}")
        warmup, total = math.ceil(self.warmup_ratio * self.total_steps), self.total_steps
        if step < warmup:
            return step / max(1, warmup)
        if self.lr_scheduler == "constant":
            return 1.0
        if self.lr_scheduler == "linear":
            return max(0.0, (total - step) / max(1, total - warmup))
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable params in AdamW groups: decay on all but biases and norm weights (HF Trainer's split); one group
    when weight_decay is 0."""
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if weight_decay == 0:
        return [{"params": [p for _, p in trainable], "weight_decay": 0.0}]
    in_norms = {id(p) for m in module.modules() if "norm" in type(m).__name__.lower() for p in m.parameters(recurse=False)}
    skip = [p for n, p in trainable if n.endswith("bias") or id(p) in in_norms]
    skip_ids = {id(p) for p in skip}
    groups = [{"params": [p for _, p in trainable if id(p) not in skip_ids], "weight_decay": weight_decay}]
    return groups + ([{"params": skip, "weight_decay": 0.0}] if skip else [])


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
    """One process or DDP (DDP all-reduces inside backward); torch AdamW under a `Recipe` (or a bare lr)."""

    def __init__(self, model: torch.nn.Module, lr: float | Recipe, weight_decay: float = 0.0) -> None:
        self.recipe = lr if isinstance(lr, Recipe) else Recipe(lr, weight_decay)
        self.model = model
        self.module = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(param_groups(self.module, self.recipe.weight_decay), lr=self.recipe.lr)
        self.steps_taken = 0

    def _set_lr(self) -> None:
        lr = self.recipe.lr * self.recipe.factor(self.steps_taken)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        """Clip (global norm over the trainable params), set the scheduled lr, take the optimizer step; a NaN or inf
        gradient stops here (NonFiniteError) with the weights untouched."""
        if self.recipe.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.recipe.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        if not torch.isfinite(norm):  # before the update: the weights stay the last good ones
            from hftlab.faults import NonFiniteError

            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(f"the gradient norm is {norm.item()} at optimizer step {self.steps_taken + 1}")
        self._set_lr()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_taken += 1

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
            torch.save({"optimizer": self.optimizer.state_dict(), "steps_taken": self.steps_taken},
                       Path(directory) / "optimizer.pt")

    def load(self, directory: str | Path) -> None:
        state = torch.load(Path(directory) / "optimizer.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps_taken = int(state["steps_taken"])


class DeepSpeedEngine(LocalEngine):
    """DeepSpeed ZeRO 0-2 with a client torch AdamW (no fused-op compile); forward through `self.model`.
    Clipping is DeepSpeed's `gradient_clipping` (global norm over the partitions), the lr our schedule's."""

    def __init__(self, model: torch.nn.Module, lr: float | Recipe, weight_decay: float = 0.0, zero_stage: int = 2,
                 bf16: bool = False) -> None:
        import deepspeed

        if zero_stage not in (0, 1, 2):
            raise ValueError(f"zero_stage must be 0, 1 or 2 (stage 3 shards the weights the probes read), got {zero_stage}")
        self.recipe = lr if isinstance(lr, Recipe) else Recipe(lr, weight_decay)
        optimizer = torch.optim.AdamW(param_groups(model, self.recipe.weight_decay), lr=self.recipe.lr)
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": zero_stage}, "zero_allow_untested_optimizer": True,
                  "gradient_clipping": self.recipe.max_grad_norm or 0.0}
        if bf16:  # GPU: bf16 weights and activations, fp32 master weights and optimizer state kept by DeepSpeed
            config["bf16"] = {"enabled": True}
        self.model, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.module = self.model.module
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.steps_taken = 0

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)

    def step(self) -> None:
        self._set_lr()
        self.model.step()
        self.steps_taken += 1

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
        torch.save({"optimizer": self.optimizer.state_dict(), "steps_taken": self.steps_taken},
                   Path(directory) / f"optimizer-rank{rank}.pt")

    def load(self, directory: str | Path) -> None:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        files = sorted(Path(directory).glob("optimizer-rank*.pt"), key=lambda f: int(f.stem.split("rank")[1]))
        # ZeRO's state holds these three plain DeepSpeed types besides tensors (listed by get_unsafe_globals_in_checkpoint)
        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
            saved = [torch.load(f, weights_only=True) for f in files]
        self.optimizer.load_state_dict([s["optimizer"] for s in saved])  # ZeRO takes every rank's partition
        self.steps_taken = int(saved[0]["steps_taken"])
