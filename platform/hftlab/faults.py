"""Faults a run stops on with one line (the CLI prints it, no traceback): kept free of torch, so the CLI imports it."""

from __future__ import annotations

import math


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN or inf: the stage stops, its last good checkpoint kept, nothing marked finished."""


class DiskFullError(RuntimeError):
    """The disk filled while a stage or cache file was written: the half-written copy removed, nothing marked finished."""


def check_finite(value: float, what: str, step: int) -> None:
    """NonFiniteError naming `what` and the optimizer step when `value` is NaN or inf."""
    if not math.isfinite(value):
        raise NonFiniteError(f"{what} is {value} at optimizer step {step}")
