"""The trained judge's fine-tuning survives a kill: its state every `checkpoint_every` steps, beside the judge's cache.

The judge trains once for tens of minutes; a killed training used to start again from nothing. Every
eval.judge.train.checkpoint_every optimizer steps the trained weights (top layers, norm, head), AdamW's and the
schedule's state, the epoch's batch order (its RNG state at the epoch's start) and the losses so far are written, one
file replaced atomically, into `.ckpt-<judge dir>` beside the judge's cache directory. A rerun of the same judge (same
key) loads it, skips the steps already taken and continues on the same batches: the judge it writes is the one an
uninterrupted training writes (tests/test_judges.py). The directory goes when the judge is saved.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

STATE = "state.pt"


class JudgeResume:
    """Saves and restores the fine-tuning's state in `directory` every `every` steps (0: never)."""

    def __init__(self, directory: str | Path, every: int, log=print) -> None:
        self.directory, self.every, self.log = Path(directory), every, log

    def load(self) -> dict | None:
        """The saved state, or None when there is none (or it cannot be read: then training starts over)."""
        path = self.directory / STATE
        if not path.is_file():
            return None
        try:
            state = torch.load(path, weights_only=True)  # tensors, numbers, tuples: the RNG states load as such
        except Exception as err:  # a file cut by a kill is replaced atomically, so this is a foreign or stale file
            self.log(f"[judge] ignoring an unreadable checkpoint {path} ({type(err).__name__}); training from the start")
            return None
        self.log(f"[judge] resuming from step {state['step']} ({path})")
        return state

    def maybe_save(self, step: int, total: int, state: Callable[[], dict]) -> None:
        """Write `state()` when `step` (the steps taken) is a multiple of `every` and not the last step."""
        if self.every <= 0 or step % self.every or step >= total:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".{STATE}.tmp"
        torch.save(state(), tmp)
        os.replace(tmp, self.directory / STATE)  # a kill mid-write leaves the previous state whole

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def snapshot(step: int, epoch: int, epoch_rng: tuple, epoch_loss: float, losses: list[float], net, opt, sched) -> dict:
    """What a resume needs: the steps taken, the epoch and its RNG state at its start, the losses, the trained weights,
    the optimizer's and the schedule's state, torch's RNG (dropout)."""
    return {"step": step, "epoch": epoch, "epoch_rng": epoch_rng, "epoch_loss": epoch_loss, "losses": list(losses),
            "net": net.trained_state(), "opt": opt.state_dict(), "sched": sched.state_dict(),
            "torch_rng": torch.get_rng_state()}


def restore(saved: dict, net, opt, sched, rng: random.Random) -> tuple[list[float], int, float, int]:
    """Put a snapshot back; returns (losses of the finished epochs, steps taken, this epoch's loss so far, epoch)."""
    net.load_state_dict(saved["net"], strict=False)
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    torch.set_rng_state(saved["torch_rng"])
    rng.setstate(saved["epoch_rng"])
    return saved["losses"], saved["step"], saved["epoch_loss"], saved["epoch"]
