"""The local MLflow store is created atomically (hftlab/tracking/store.py, docs/reliability.md): two processes making
one new store both succeed; a store left half-made by a killed creation is rebuilt when it holds nothing and refused
with one line when it holds runs; a driver killed while the store is being made reruns to an uninterrupted run's
metrics. Real MLflow, real processes, real SIGKILL."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from hftlab.config.errors import ConfigError
from hftlab.tracking import store as mlflow_store
from hftlab.tracking.store import prepare, state

from .conftest import REPO
from .test_reliability import _metrics, _run, assert_same_metrics

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}

RACE = """
import sys, time
from pathlib import Path
from hftlab.config import load_config
from hftlab.tracking.logger import Tracker
cfg = load_config(sys.argv[1], sys.argv[3:])
while not Path(sys.argv[2]).exists():  # both open the new store at once
    time.sleep(0.005)
with Tracker(cfg, run_name="racer") as tracker:
    tracker.metrics({"x": 1.0})
print("RUN", tracker.run_id, flush=True)
"""


def test_two_processes_creating_one_new_store_at_once_both_succeed(tmp_path):
    db, go = tmp_path / "store" / "mlflow.db", tmp_path / "go"
    args = [f"output_dir={tmp_path / 'outputs'}", f"tracking.tracking_uri=sqlite:///{db}"]
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(REPO / "configs" / "smoke.yaml"), str(go), *args],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV) for _ in range(2)]
    time.sleep(6)  # both imported and waiting at the barrier
    go.write_text("go")
    logs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], logs
    ids = {line.split()[1] for log in logs for line in log.splitlines() if line.startswith("RUN ")}
    assert len(ids) == 2 and state(db) is None
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert {r.info.run_id for r in runs} == ids and all(r.info.status == "FINISHED" for r in runs)
    assert not list(db.parent.glob(".mlflow.db.tmp-*"))


CREATE = "import sys, mlflow; mlflow.MlflowClient(sys.argv[1]).search_experiments()"  # MLflow making a store itself


def _size(path: Path) -> int:
    """A file's size, 0 once it is gone (the store's journal comes and goes while we look)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def half_made(db: Path) -> str:
    """A store as a SIGKILL in the middle of MLflow's own creation leaves it (killed once the migrations are under
    way); returns what is wrong with it."""
    for _ in range(3):
        db.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", CREATE, f"sqlite:///{db}"], stderr=subprocess.DEVNULL, env=ENV)
        end = time.time() + 120
        while not (db.exists() and db.stat().st_size > 200_000) and proc.poll() is None and time.time() < end:
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        why = state(db)
        if why not in (None, "missing"):
            return why
    pytest.fail("three kills all missed MLflow's store creation")


def test_a_store_half_made_by_a_killed_creation_is_rebuilt_when_empty(tmp_path):
    db = tmp_path / "mlflow.db"
    why = half_made(db)
    assert "interrupted" in why
    logs: list[str] = []
    prepare(f"sqlite:///{db}", log=logs.append)
    assert state(db) is None
    assert len(logs) == 1 and "was not whole" in logs[0] and "made it again" in logs[0], logs
    client = mlflow.MlflowClient(f"sqlite:///{db}")  # usable: a run goes in and comes back
    run = client.create_run(client.create_experiment("after"))
    client.log_metric(run.info.run_id, "x", 1.0)
    assert client.get_run(run.info.run_id).data.metrics == {"x": 1.0}
    assert not list(tmp_path.glob(".mlflow.db.tmp-*"))


def test_a_store_that_is_not_whole_but_holds_runs_is_refused_with_one_line(tmp_path):
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    prepare(uri)
    client = mlflow.MlflowClient(uri)
    client.create_run(client.create_experiment("smoke"))
    with sqlite3.connect(db) as con:  # an upgrade interrupted before alembic recorded its revision
        con.execute("DELETE FROM alembic_version")
    before = db.read_bytes()
    with pytest.raises(ConfigError) as err:
        mlflow_store._READY.discard(str(db))  # as a new process would: the check is made once per process
        prepare(uri)
    message = f"hftlab: config error: {err.value}"
    assert err.value.field == "tracking.tracking_uri" and str(db) in message and "runs: 1" in message, message
    assert "\n" not in message and "mlflow db upgrade" in message and "move it aside" in message
    assert db.read_bytes() == before  # nothing deleted
    # the same through the CLI: exit 2 and one line on stderr, no traceback
    done = subprocess.run([sys.executable, "-m", "hftlab.cli", "run", str(REPO / "configs" / "smoke.yaml"),
                           f"output_dir={tmp_path / 'outputs'}", f"tracking.tracking_uri={uri}"],
                          capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.strip() and " INFO " not in line]
    assert done.returncode == 2 and len(errors) == 1, done.stderr
    assert errors[0].startswith("hftlab: config error: tracking.tracking_uri=") and "Traceback" not in done.stderr
    assert db.read_bytes() == before


def test_a_driver_killed_while_the_new_store_is_made_reruns_to_an_uninterrupted_runs_metrics(tmp_path, tiny_cache):
    """SIGKILL `hftlab run configs/smoke.yaml output_dir=D tracking.tracking_uri=sqlite:///D.db` mid-creation."""
    common = [f"cache_dir={tiny_cache}", "align.epochs=1", "finetune.epochs=1", "finetune.n=200", "eval.max_new_tokens=8",
              "base.tiny.pretrain_epochs=1"]  # a small run: the whole test in about a minute on 2 idle cores
    ref_dir = tmp_path / "uninterrupted"
    ref_dir.mkdir()
    ref_uri = f"sqlite:///{ref_dir / 'D.db'}"
    procs: list[subprocess.Popen] = []
    try:
        procs.append(_run([*common, f"output_dir={ref_dir / 'D'}", f"tracking.tracking_uri={ref_uri}"], ref_dir / "log"))
        assert procs[-1].wait(timeout=900) == 0, (ref_dir / "log").read_text()
        expected = _metrics(ref_uri)["metrics"]

        work = tmp_path / "killed"
        work.mkdir()
        db = work / "D.db"
        args = [*common, f"output_dir={work / 'D'}", f"tracking.tracking_uri=sqlite:///{db}"]
        procs.append(_run(args, work / "log1"))
        end = time.time() + 300
        while not any(_size(t) > 200_000 for t in work.glob(".D.db.tmp-*")):  # migrating
            assert procs[-1].poll() is None and time.time() < end, (work / "log1").read_text()
            time.sleep(0.002)
        os.kill(procs[-1].pid, signal.SIGKILL)
        procs[-1].wait()
        assert not db.exists()  # the store did not appear half-made: it is not there at all
        assert list(work.glob(".D.db.tmp-*"))  # what the killed creation left, beside it
        procs.append(_run(args, work / "log2"))
        assert procs[-1].wait(timeout=900) == 0, (work / "log2").read_text()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    got = _metrics(f"sqlite:///{db}")
    assert got["status"] == "FINISHED" and state(db) is None
    assert not list(work.glob(".D.db.tmp-*"))
    assert_same_metrics(got["metrics"], expected)
