"""The one progress bar of long work (training steps, judging rows): a small leaf both training/ and judges/ use."""

from __future__ import annotations

import sys


def progress_bar(total: int, desc: str, unit: str = "step", initial: int = 0):
    """A bar with rate and time left on stderr; in a log file (no TTY) one line every 30 s at most. `initial`: the
    steps a resumed run had already done."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 30)
