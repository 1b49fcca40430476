"""A run's MLflow run that survives the tracker going away: what cannot be sent waits on disk, in order.

- MLflow unreachable at start: stop at once with one line naming `tracking.tracking_uri` (`tracking.on_error: fail`),
  or log into a local SQLite store under output_dir instead and say so (`on_error: local`).
- MLflow going away mid-run: the call that fails (connection refused, a timeout, a 5xx) goes to the run's outbox,
  `<output_dir>/tracking-outbox/<run id>/outbox.jsonl` (files it names copied beside it), and training and evaluation
  go on. Each later call first sends the outbox (at most every `RETRY_SECONDS`), so metrics arrive in the order they
  were logged, with their step and time. What is left at the end is in the run's summary, and `hftlab tracking sync`
  sends it later.

Calls go through an MlflowClient with the run id (no fluent active run), so a failed call leaves no process-global
state behind. tracking/client.py holds the helpers (URIs, experiments, the orphan lookup) that sweeps and reports share.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # fail over to the outbox in seconds, not minutes
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402

from hftlab.config.errors import ConfigError  # noqa: E402
from hftlab.config.loader import digest, flatten, to_dict  # noqa: E402
from hftlab.config.schema import Config  # noqa: E402
from hftlab.storage import atomic_write_text  # noqa: E402
from hftlab.tracking.client import ensure_experiment, git_commit, is_rank_zero, orphaned_run, redact, resolve_uri  # noqa: E402
from hftlab.tracking.store import prepare  # noqa: E402

RETRY_SECONDS = 10.0


def reachable(uri: str, timeout: float = 5.0) -> str | None:
    """None when an http(s) tracking server answers /health (a local store always does), else why not."""
    if not uri.startswith(("http://", "https://")):
        return None
    import base64
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(uri)
    bare = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl().rstrip("/")
    request = urllib.request.Request(f"{bare}/health")
    if parts.username is not None:  # credentials in the URI (as the MLflow client sends them): basic auth
        pair = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(pair.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return None if resp.status == 200 else f"/health answered {resp.status}"
    except OSError as err:
        return str(getattr(err, "reason", err))


def send(client, run_id: str, kind: str, p: dict) -> None:
    """One logged call, replayed as it was made (the outbox and the live path share it)."""
    if kind == "metrics":
        client.log_batch(run_id, metrics=[Metric(k, float(v), p["ts"], p["step"] or 0) for k, v in p["values"].items()])
    elif kind == "params":
        items = [Param(k, str(v)) for k, v in p["values"].items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            client.log_batch(run_id, params=items[i : i + 100])
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in p["values"].items()])
    elif kind == "text":
        client.log_text(run_id, p["text"], p["name"])
    elif kind == "table":
        client.log_table(run_id, data=p["columns"], artifact_file=p["name"])
    elif kind == "artifact":
        path = Path(p["path"])
        if path.is_dir():
            client.log_artifacts(run_id, str(path), p["artifact_path"])
        else:
            client.log_artifact(run_id, str(path), p["artifact_path"])
    elif kind == "end":
        client.set_terminated(run_id, status=p["status"])
    else:
        raise ValueError(f"unknown outbox entry {kind!r}")


class Outbox:
    """The calls a run could not send yet, oldest first, as JSON lines; rewritten atomically as they go out."""

    def __init__(self, directory: str | Path, uri: str, run_id: str) -> None:
        self.directory, self.uri, self.run_id = Path(directory), uri, run_id
        self.file = self.directory / "outbox.jsonl"

    def entries(self) -> list[dict]:
        if not self.file.is_file():
            return []
        out = []
        for line in self.file.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill mid-append: what came before it still goes
                break
        return out

    def add(self, kind: str, payload: dict) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if kind == "artifact" and Path(payload["path"]).is_file():  # a temp file may be gone when it is sent
            n = len(list(self.directory.glob("file-*")))
            keep = self.directory / f"file-{n:05d}" / Path(payload["path"]).name
            keep.parent.mkdir()
            shutil.copy2(payload["path"], keep)
            payload = {**payload, "path": str(keep)}
        with self.file.open("a") as fh:
            fh.write(json.dumps({"kind": kind, "payload": payload}) + "\n")

    def flush(self) -> int:
        """Send what can be sent, in order; returns how many are still waiting (and raises nothing)."""
        pending = self.entries()
        client, sent = mlflow.MlflowClient(self.uri), 0
        for entry in pending:
            try:
                send(client, self.run_id, entry["kind"], entry["payload"])
            except Exception:  # still down: keep the rest for later
                break
            sent += 1
        if sent:
            rest = pending[sent:]
            atomic_write_text(self.file, "".join(json.dumps(e) + "\n" for e in rest))
            if not rest:
                shutil.rmtree(self.directory, ignore_errors=True)
        return len(pending) - sent


def sync(output_dir: str | Path, log=print) -> int:
    """`hftlab tracking sync`: send every run's outbox under output_dir; returns the calls still waiting."""
    waiting = 0
    for meta in sorted(Path(output_dir).glob("tracking-outbox/*/run.json")):
        info = json.loads(meta.read_text())
        left = Outbox(meta.parent, info["uri"], info["run_id"]).flush()
        log(f"[tracking] run {info['run_id']} at {redact(info['uri'])}: {'all sent' if not left else f'{left} calls still wait'}")
        waiting += left
    return waiting


class Tracker:
    """A thin, optional MLflow run: every method is a no-op when tracking is disabled or off rank 0.

    `parent_run_id` nests the run under a sweep's parent run; `run_id` continues an existing run (a sweep trial
    restarted after a crash); `tags` are set on the run. Every run carries `hftlab.git_commit`, `hftlab.config_hash`
    and `hftlab.driver` (host:pid). A run whose driver was killed (SIGKILL, the OOM killer) stays RUNNING; the same
    command run again on that host continues it (tracking.orphaned_run), so no orphan is left. `delayed`: the calls
    waiting in the outbox (module docstring).
    """

    def __init__(self, cfg: Config, run_name: str | None = None, *, parent_run_id: str | None = None,
                 tags: dict[str, Any] | None = None, run_id: str | None = None, log=print) -> None:
        self.enabled = cfg.tracking.enabled and is_rank_zero()
        self.uri, self.log = resolve_uri(cfg), log
        self.run_id: str | None = None
        self.outbox: Outbox | None = None
        self._warned, self._last_try = False, 0.0
        if not self.enabled:
            return
        why = reachable(self.uri)
        if why is not None:
            if cfg.tracking.on_error == "fail":
                raise ConfigError("tracking.tracking_uri", redact(self.uri), f"MLflow is not reachable ({why}): start the "
                                  "server, or set tracking.on_error=local to log into a local store instead")
            local = f"sqlite:///{Path(cfg.output_dir).resolve() / 'mlflow-local.db'}"
            log(f"[tracking] MLflow at {redact(self.uri)} is not reachable ({why}): logging into {local} instead "
                "(tracking.on_error=local)")
            self.uri = local
        prepare(self.uri, log)  # a new local store appears whole (a kill while MLflow makes it leaves no half store)
        self.client = mlflow.MlflowClient(self.uri)
        mlflow.set_tracking_uri(self.uri)  # so `mlflow.get_run(summary["run_id"])` works after `run()`, as before
        exp_id = ensure_experiment(self.uri, cfg.tracking.experiment or cfg.name)
        config_hash, driver = digest(cfg), f"{socket.gethostname()}:{os.getpid()}"
        all_tags = {"hftlab.git_commit": git_commit(), "hftlab.config_hash": config_hash, "hftlab.driver": driver,
                    "mlflow.user": getpass.getuser(), "mlflow.source.name": Path(sys.argv[0]).name,
                    "mlflow.source.type": "LOCAL", **{k: str(v) for k, v in (tags or {}).items()}}
        if not run_id and parent_run_id is None:  # a killed driver's run, rerun with the same command: continue it
            orphan = orphaned_run(self.uri, exp_id, config_hash, run_name)
            if orphan is not None:
                run_id, old_driver = orphan
                all_tags["hftlab.continues_driver"] = old_driver
                log(f"[tracking] continuing MLflow run {run_id}: its driver ({old_driver}) died before it ended")
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
        else:
            if parent_run_id is not None:
                all_tags["mlflow.parentRunId"] = parent_run_id
            self.run_id = self.client.create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id
        self.outbox = Outbox(Path(cfg.output_dir) / "tracking-outbox" / self.run_id, self.uri, self.run_id)
        self._call("tags", {"values": all_tags})
        params = {k: ("null" if v is None else redact(v)) for k, v in flatten(to_dict(cfg)).items()}
        self._call("params", {"values": params})  # a URI's password never becomes a param

    @property
    def delayed(self) -> int:
        return len(self.outbox.entries()) if self.outbox is not None else 0

    def _call(self, kind: str, payload: dict) -> None:
        """Send now, or after the calls already waiting; on failure into the outbox, and the run goes on."""
        if self.outbox.file.is_file() and time.time() - self._last_try >= RETRY_SECONDS:
            self._last_try = time.time()
            if self.outbox.flush() == 0 and self._warned:
                self.log(f"[tracking] MLflow at {redact(self.uri)} is back: the delayed calls are sent")
                self._warned = False
        if self.outbox.file.is_file():  # keep the order: nothing overtakes what waits
            self.outbox.add(kind, payload)
            return
        try:
            send(self.client, self.run_id, kind, payload)
        except Exception as err:
            self._save(kind, payload, err)

    def _save(self, kind: str, payload: dict, err: Exception) -> None:
        self.outbox.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.outbox.directory / "run.json", json.dumps({"uri": self.uri, "run_id": self.run_id}))
        self.outbox.add(kind, payload)
        self._last_try = time.time()
        if not self._warned:
            first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            self.log(f"[tracking] MLflow at {redact(self.uri)} failed ({first}); the run goes on, its metrics wait in "
                     f"{self.outbox.directory} and are sent when it is back (or: hftlab tracking sync)")
            self._warned = True

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.enabled:  # stopped from outside (Ctrl+C, a scheduler's SystemExit) is not a failure of the run
            stopped = exc_type is not None and issubclass(exc_type, KeyboardInterrupt | SystemExit)
            self._last_try = 0.0  # one last try to send what waits
            self._call("end", {"status": "FINISHED" if exc_type is None else "KILLED" if stopped else "FAILED"})

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        if self.enabled:
            self._call("metrics", {"values": {k: float(v) for k, v in values.items()}, "step": step,
                                   "ts": int(time.time() * 1000)})

    def tags(self, values: dict[str, Any]) -> None:
        if self.enabled:
            self._call("tags", {"values": {k: str(v) for k, v in values.items()}})

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file or a whole directory."""
        if self.enabled:
            self._call("artifact", {"path": str(path), "artifact_path": artifact_path})

    def text(self, text: str, name: str) -> None:
        if self.enabled:
            self._call("text", {"text": text, "name": name})

    def table(self, columns: dict[str, list], name: str) -> None:
        """A table artifact (JSON, shown as a table in the MLflow UI's artifact view)."""
        if self.enabled:
            self._call("table", {"columns": columns, "name": name})
