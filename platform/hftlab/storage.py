"""Atomic outputs: a stage's directory appears whole or not at all, so a crash never leaves half a model."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temp dir beside `final`; rename it to `final` only if the block succeeds.

    If `final` already exists (another process finished first), the new copy is dropped.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file via a temp file and rename: readers see the old or the new content, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


@contextmanager
def stage_lock(final: str | Path, log=print, poll: float = 0.5) -> Iterator[None]:
    """Hold `.<name>.lock` beside `final` (an exclusive flock) for the block: one process computes a stage at a time.

    Stale locks recover by themselves: the kernel drops a dead holder's flock, so a killed process never blocks the
    next one. The file holds the holder's host and pid, for the waiter's message. It is never deleted (deleting a
    lock file another process has open would let two hold "the" lock).
    """
    import fcntl
    import socket
    import time

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    path = final.parent / f".{final.name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    holder = Path(path).read_text().strip() or "another process"
                    log(f"[lock] waiting for {final.name}: {holder} is computing it")
                    waited = True
                time.sleep(poll)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def computed_once(final: str | Path, finished, log=print) -> Iterator[bool]:
    """Yield True when this process must compute `final` (holding its stage_lock), False when it is already there.

    `finished()` says whether `final` is complete; it is asked again once the lock is held, so a process that waited
    for another one reuses what that one wrote instead of computing it twice.
    """
    if finished():
        yield False
        return
    with stage_lock(final, log):
        yield not finished()
