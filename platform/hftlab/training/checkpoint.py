"""Resumable in-process training: a stage killed mid-way continues from its last checkpoint, not from step 0.

A checkpoint is a directory `step-<n>` under the stage's checkpoint directory (beside the stage's output, never
inside it), written atomically (storage.atomic_dir) so a kill mid-write leaves the previous one whole:
the trainable weights (safetensors), the optimizer and the lr schedule's position (engine.save), the algorithm step's
state (VAA's sampler, SafeGrad's cached gradient, Lisa's phase), torch's RNG (dropout), how far each batch stream was
read, and the losses so far. Restored, the run continues with the same batches, draws and moments, so its weights
equal an uninterrupted run's. Ray Train's workers checkpoint through Ray instead (training/trainer.py).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hftlab.storage import atomic_dir


class Counted:
    """A batch source that counts its reads, so a resumed run can skip exactly as many."""

    def __init__(self, fn: Callable) -> None:
        self.fn, self.reads = fn, 0

    def __call__(self, *args):
        self.reads += 1
        return self.fn(*args)

    def skip(self, n: int) -> None:
        for _ in range(n):
            self.fn()
        self.reads = n


def auto_every(every: int, total: int) -> int:
    """The cadence: `checkpoint_every` when set, else about a tenth of the stage (0 for stages under 4 steps)."""
    if every:
        return every
    return math.ceil(total / 10) if total >= 4 else 0


class Checkpoint:
    """One training stage's checkpoints in `directory` (the latest kept); `every` optimizer steps (0: auto_every),
    never at the end (the stage's own output is written then, and clear() drops the checkpoints)."""

    def __init__(self, directory: str | Path, every: int, log=print) -> None:
        self.directory, self.every, self.log = Path(directory), every, log
        self.streams: dict[str, Counted] = {}

    def track(self, name: str, source: Counted) -> Counted:
        """A batch source besides the stage's own batches (a side stream, a VAA group) whose reads are saved."""
        self.streams[name] = source
        return source

    def latest(self) -> Path | None:
        found = [d for d in self.directory.glob("step-*") if (d / "state.pt").is_file()]
        return max(found, key=lambda d: int(d.name.split("-")[1])) if found else None

    def restore(self, model: torch.nn.Module, engine, step_fn) -> tuple[int, dict[str, Any]]:
        """Load the latest checkpoint into model, engine, step and streams; (0, {}) when there is none."""
        last = self.latest()
        if last is None:
            return 0, {}
        from safetensors.torch import load_file

        weights = load_file(str(last / "weights.safetensors"))
        params = dict(model.named_parameters())
        missing = [n for n in weights if n not in params]
        if missing:
            raise RuntimeError(f"checkpoint {last} does not fit the model (no parameter {missing[0]}): delete it to restart")
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        engine.load(last)
        state = torch.load(last / "state.pt", weights_only=True)
        if hasattr(step_fn, "load_state_dict") and state["step_state"] is not None:
            step_fn.load_state_dict(state["step_state"])
        for name, reads in state["reads"].items():
            self.streams[name].skip(int(reads))
        torch.set_rng_state(state["rng"])
        self.log(f"[resume] {self.directory.name}: continuing from step {state['step']} ({last})")
        return int(state["step"]), state["extra"]

    def maybe_save(self, step: int, total: int, model: torch.nn.Module, engine, step_fn, extra: dict[str, Any]) -> None:
        every = auto_every(self.every, total)
        if not every or step % every or step >= total:
            return
        from safetensors.torch import save_file

        with atomic_dir(self.directory / f"step-{step:07d}") as tmp:
            save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                      str(tmp / "weights.safetensors"))
            engine.save(tmp, 0)
            torch.save({"step": step, "rng": torch.get_rng_state(), "extra": extra,
                        "step_state": step_fn.state_dict() if hasattr(step_fn, "state_dict") else None,
                        "reads": {name: s.reads for name, s in self.streams.items()}}, tmp / "state.pt")
        for old in self.directory.glob("step-*"):
            if old.name != f"step-{step:07d}":
                shutil.rmtree(old, ignore_errors=True)

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
