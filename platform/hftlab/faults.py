"""Faults a run stops on with one line (the CLI prints it, no traceback): kept free of torch, so the CLI imports it."""

from __future__ import annotations

import math
from dataclasses import dataclass


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN or inf: the stage stops, its last good checkpoint kept, nothing marked finished."""


class DiskFullError(RuntimeError):
    """The disk filled while a stage or cache file was written: the half-written copy removed, nothing marked finished."""


class InjectedFault(RuntimeError):
    """A failure a test asked for (CrashOnce): what a worker dying mid-stage looks like to Ray Train."""


@dataclass(frozen=True)
class CrashOnce:
    """Fault injection for tests of recovery: a distributed stage's first attempt raises after optimizer step `step`
    (with `max_failures` >= 1 Ray Train restarts it from its latest checkpoint; the retry does not crash)."""

    step: int

    def check(self, done: int, first_attempt: bool) -> None:
        if first_attempt and done == self.step:
            raise InjectedFault(f"injected failure at step {done}")


def check_finite(value: float, what: str, step: int) -> None:
    """NonFiniteError naming `what` and the optimizer step when `value` is NaN or inf."""
    if not math.isfinite(value):
        raise NonFiniteError(f"{what} is {value} at optimizer step {step}")
