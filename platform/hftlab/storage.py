"""Atomic outputs: a stage's directory appears whole or not at all, so a crash never leaves half a model."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hftlab.faults import DiskFullError, NonFiniteError


def cache_root(cfg) -> Path:
    """Where what is made once and reused lives (tiny bases, converted models, judges, vLLM copies): cfg.cache_dir,
    then $HFTLAB_CACHE, then ~/.cache/hftlab."""
    root = cfg.cache_dir or os.environ.get("HFTLAB_CACHE") or Path.home() / ".cache" / "hftlab"
    return Path(root)


FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
LOW_FREE = 16 * 2**20  # bytes: below this a failed write is taken for a full disk (torch.save says only "unexpected pos")


def _full(err: BaseException, where: Path) -> str | None:
    """Why `err` looks like a full disk under `where` (an ENOSPC-like errno in its chain, the OS's words in a library's
    message, or almost no space left), else None. Asked before the half-written copy is removed."""
    if isinstance(err, (DiskFullError, NonFiniteError)):
        return None
    e: BaseException | None = err
    while e is not None:
        if isinstance(e, OSError) and e.errno in FULL:
            return e.strerror or str(e)
        if "No space left on device" in str(e) or "os error 28" in str(e):
            return "No space left on device"
        e = e.__cause__ or e.__context__
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return None
    return f"{free / 2**20:.1f} MB left after: {type(err).__name__}: {err}" if free < LOW_FREE else None


def _disk_full(err: BaseException, final: Path) -> DiskFullError | None:
    reason = _full(err, final.parent)
    if reason is None:
        return None
    return DiskFullError(f"the disk under {final.parent} is full: writing {final.name} failed ({reason}). The "
                         "half-written copy was removed and nothing was marked finished; free space (or point "
                         "output_dir / cache_dir elsewhere) and rerun the same command: finished stages are reused")


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temp dir beside `final`; rename it to `final` only if the block succeeds.

    If `final` already exists (another process finished first), the new copy is dropped. A write that fails on a full
    disk becomes one DiskFullError naming the directory, the half-written copy removed.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        try:
            yield tmp
        except Exception as err:
            full = _disk_full(err, final)
            if full is not None:
                raise full from err
            raise
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
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except Exception as err:
        full = _disk_full(err, path)
        Path(tmp).unlink(missing_ok=True)
        if full is not None:
            raise full from err
        raise


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
        try:  # who holds it, for a waiter's message only: a full disk must not stop the stage here
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        except OSError:
            pass
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
