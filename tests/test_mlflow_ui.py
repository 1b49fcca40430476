"""The MLflow UI on a sweep's local store, in a real headless Chromium: the runs table lists the trials
with their HS/FA columns. The screenshot is kept under test-artifacts/mlflow-ui/ (git-ignored).

Why the URL is not just `#/experiments/<id>`: MLflow 3.17 opens an experiment on its GenAI overview, and
its runs table shows no metric columns until a user picks them. A sweep therefore saves a view of the
runs table with MLflow's own "share view" mechanism (an experiment tag holding the selected columns, the
sort and the expanded parent row) and prints its URL, `#/experiments/<id>/runs?viewStateShareKey=...`;
this test opens that URL as a user would. Chromium is Debian's `chromium`, driven from its command line
(--dump-dom, --screenshot), no Python browser package.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from hftlab.run.pipeline import run
from hftlab.sweep.runner import finish, trials_of
from hftlab.sweep.spec import SweepConfig
from hftlab.tracking import client as tracking
from tests.conftest import REPO, free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("HFTLAB_TEST_ARTIFACTS", REPO / "test-artifacts")) / "mlflow-ui"
TINY = ["finetune.n=100", "finetune.epochs=2", "align.epochs=2", "eval.n_harmful=20", "eval.n_task=20", "threads=1"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (apt-get install -y chromium)")


def chromium(url: str, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium on `url` after 15 s of virtual time (the React app's requests settle in that)."""
    profile = tempfile.mkdtemp(prefix="hftlab-chromium-")
    try:
        return subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--window-size=1700,1000", "--virtual-time-budget=15000", *args, url],
            capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def visible_text(dom: str) -> str:
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


@pytest.fixture
def mlflow_ui(tmp_path: Path):
    """Factory: starts `mlflow ui` on a backend store (127.0.0.1, a free port) and returns a function that
    waits for it and gives its URL; stopped at the end. Starting it first lets it boot while runs train."""
    procs: list[subprocess.Popen] = []

    def start(store: str):
        port = free_port()
        log = open(tmp_path / "mlflow-ui.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--host", "127.0.0.1",
                                 "--port", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        procs.append(proc)

        def ready() -> str:
            deadline = time.time() + 120
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                        if resp.status == 200:
                            return f"http://127.0.0.1:{port}"
                except OSError:
                    pass
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError((tmp_path / "mlflow-ui.log").read_text()[-2000:])
                time.sleep(0.5)

        return ready

    yield start
    for proc in procs:  # its own process group: uvicorn and MLflow's job runner go with it
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.mark.slow
def test_mlflow_ui_lists_the_sweep_runs_with_hs_and_fa_columns(tmp_path, smoke, mlflow_ui):
    # a small store with real runs: a sweep parent and two trials of the real pipeline (no Tune needed here)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = tracking.start_parent(uri, "ui-sweep", "ui-sweep", tags={"hftlab.role": "sweep", "hftlab.sweep": "ui-sweep"},
                                   params={})
    ui_ready = mlflow_ui(uri)  # boots while the trials train
    spec = SweepConfig(base=str(REPO / "configs" / "smoke.yaml"), name="ui-sweep",
                       space={"finetune.poison_ratio": {"grid": [0.05, 0.3]}})
    trials = {}
    for p in (0.05, 0.3):
        cfg = smoke(*TINY, "tracking.experiment=ui-sweep", f"finetune.poison_ratio={p}")
        name = f"sft+sft poison_ratio={p}"
        trials[name] = run(cfg, log=lambda *_: None, parent_run_id=parent, run_name=name,
                           tags={"hftlab.sweep": "ui-sweep", "hftlab.role": "trial"})
    setup = {"tracking_uri": uri, "experiment": "ui-sweep", "parent_run_id": parent}
    result = finish(spec, trials_of(spec), setup, tmp_path, 2, 0, False, log=lambda *_: None)
    assert result["ui"].startswith("#/experiments/") and "viewStateShareKey=hftlab-ui-sweep" in result["ui"]

    url = f"{ui_ready()}/{result['ui']}"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "runs-page.png"
    shot.unlink(missing_ok=True)
    text = visible_text(chromium(url, "--dump-dom", f"--screenshot={shot}").stdout)  # one page load, both outputs
    (ARTIFACTS / "runs-page.txt").write_text(text)

    assert "Training runs" in text and "Run Name" in text, text[:2000]
    table = text[text.index("Run Name"):]
    assert "ui-sweep" in table  # the parent row, expanded ...
    for name in trials:  # ... over every trial
        assert name in table, table[:3000]
    for column in ("finetuned.hs", "finetuned.fa", "aligned.hs", "finetune.poison_ratio"):
        assert column in table, table[:3000]
    for summary in trials.values():  # and the trials' own HS and FA values in the cells
        assert f" {summary['finetuned']['hs']:g} " in table and f" {summary['finetuned']['fa']:g} " in table
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
