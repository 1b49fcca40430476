"""A local MLflow store (a `sqlite:///` file) appears whole or not at all, like every other output of a run.

MLflow creates a new SQLite store in place: it makes the tables, then runs some 80 alembic migrations, and SQLite
commits each DDL statement on its own. A driver killed in those seconds leaves a file that every later run fails on
with a 60-line traceback (`table secrets already exists`). So hftlab makes a new store itself before MLflow first
opens it: under an exclusive flock on `<db>.lock`, MLflow's own store creation runs on `.<db>.tmp-*` beside it, and
the finished file is renamed into place. A store found not whole (no `alembic_version`, or not at MLflow's head
revision) is rebuilt the same way when it holds nothing (no runs, registered models or experiments besides the
default), and refused with one line naming `tracking.tracking_uri` when it does: hftlab never deletes someone's runs.
A remote tracking server (http://, postgresql://, ...) is left alone: its migrations are the server's business.
"""

from __future__ import annotations

import fcntl
import functools
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from hftlab.config.errors import ConfigError  # noqa: E402

PREFIX = "sqlite:///"
_READY: set[str] = set()  # stores this process has seen whole: checked once per process


def sqlite_path(uri: str) -> Path | None:
    """The file behind a `sqlite:///` URI (None for a server, an in-memory store, or any other URI)."""
    if not uri.startswith(PREFIX):
        return None
    rest = uri[len(PREFIX):].split("?", 1)[0]
    return None if rest in ("", ":memory:") else Path(rest)


@functools.cache
def schema() -> tuple[str, frozenset[str]]:
    """MLflow's head alembic revision and the tables its ORM expects (what MLflow itself checks on open)."""
    import mlflow.store.db.utils as db_utils
    from mlflow.store.db.base_sql_model import Base

    return db_utils._get_latest_schema_revision(), frozenset(Base.metadata.tables)


def state(path: Path) -> str | None:
    """None when the store at `path` is whole (MLflow's tables, at its head revision), "missing" when there is no
    file, else what is wrong with it, in words. Reading it also rolls back a journal a killed writer left."""
    if not path.exists():
        return "missing"
    head, expected = schema()
    try:
        with closing(sqlite3.connect(path, timeout=30)) as db:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if "alembic_version" not in tables:
                return "it has no alembic_version table: its creation was interrupted" if tables else \
                    "it is an empty file: its creation was interrupted"
            versions = [r[0] for r in db.execute("SELECT version_num FROM alembic_version")]
    except sqlite3.DatabaseError as err:
        return f"it cannot be read as SQLite ({err})"
    if versions != [head]:
        return (f"its schema is at alembic revision {', '.join(versions) or 'none'}, not MLflow's {head}: its creation "
                "or a schema upgrade was interrupted, or an older MLflow made it")
    missing = sorted(expected - tables)
    return f"tables are missing ({', '.join(missing[:3])}...): its creation was interrupted" if missing else None


def contents(path: Path) -> dict[str, int]:
    """What a store holds that a rebuild would lose: runs, registered models, experiments besides the default.
    A table that is not there holds nothing; a file that cannot be read counts as holding something."""
    queries = {"runs": "SELECT COUNT(*) FROM runs", "registered models": "SELECT COUNT(*) FROM registered_models",
               "experiments": "SELECT COUNT(*) FROM experiments WHERE experiment_id != 0"}
    found: dict[str, int] = {}
    try:
        with closing(sqlite3.connect(path, timeout=30)) as db:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            for what, query in queries.items():
                if query.split("FROM ")[1].split()[0] in tables:
                    found[what] = db.execute(query).fetchone()[0]
    except sqlite3.DatabaseError:
        return {"unreadable rows": 1}
    return {k: v for k, v in found.items() if v}


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive flock on `<db>.lock` beside the store; the kernel drops a killed holder's lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent / f"{path.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def _build(path: Path, uri: str) -> None:
    """MLflow's own store creation on a temporary file beside `path`, then a rename: the store appears whole.
    Called with the lock held; copies a killed creation left behind are removed first."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.tracking._tracking_service.utils import _get_sqlalchemy_store

    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        stale.unlink(missing_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()  # MLflow creates the file itself
    tmp_uri = f"{PREFIX}{tmp}"
    try:
        _get_sqlalchemy_store(tmp_uri, None)  # the tables, every migration, the default experiment: as MLflow does
        engine = SqlAlchemyStore._engine_map.pop(tmp_uri, None)
        if engine is not None:
            engine.dispose()  # no connection is left open on the file that is renamed next
        why = state(tmp)
        if why is not None:
            raise RuntimeError(f"MLflow made a store that is not whole: {why}")
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        for leftover in (tmp, Path(f"{tmp}-journal")):
            leftover.unlink(missing_ok=True)
    for key in {uri, f"{PREFIX}{path}"}:
        old = SqlAlchemyStore._engine_map.get(key)
        if old is not None:
            old.dispose()  # this process had the replaced file open: reconnect to the new one


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prepare(uri: str, log=print) -> None:
    """Make sure the local store at `uri` is whole before MLflow opens it (module docstring); a no-op for a server.

    Raises ConfigError (field `tracking.tracking_uri`) for a store that is not whole but holds runs or experiments.
    """
    path = sqlite_path(uri)
    if path is None:
        return
    path = path.resolve()
    if str(path) in _READY:
        return
    if state(path) is not None:
        with _locked(path):
            why = state(path)  # again under the lock: another process may have made it meanwhile
            if why == "missing":
                _build(path, uri)
            elif why is not None:
                held = contents(path)
                if held:
                    what = ", ".join(f"{k}: {n}" for k, n in held.items())
                    raise ConfigError("tracking.tracking_uri", uri, f"the MLflow store {path} is not whole ({why}) "
                                      f"and holds {what}, so hftlab leaves it as it is: back it up, then run 'mlflow "
                                      f"db upgrade {PREFIX}{path}', or move it aside to start a new store")
                log(f"[tracking] the MLflow store {path} was not whole ({why}); it held no runs: made it again")
                _build(path, uri)
    _READY.add(str(path))
