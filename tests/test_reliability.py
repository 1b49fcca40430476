"""Faults a long run meets (docs/reliability.md): a stage killed mid-way, a killed driver, racing processes, a NaN,
an unwritable output directory. Real processes, real SIGKILL, real files; only our own step is poisoned for the NaN."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hftlab.config.errors import ConfigError
from hftlab.faults import NonFiniteError
from hftlab.run.inputs import plan, side_pairs
from hftlab.run.stages import base_model, train_stage
from hftlab.tracking.logger import Tracker
from hftlab.training.checkpoint import Checkpoint

from .conftest import REPO


class Crash(Exception):
    """Stands for the kill: raised right after a checkpoint was written."""


def weights(stage_dir: str | Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(stage_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def finished(output_dir: Path, kind: str) -> list[Path]:
    return [d for d in output_dir.glob(f"{kind}-*")
            if (d / "config.json").is_file() or (d / "adapter_config.json").is_file()]


def stage_inputs(cfg, kind: str):
    p = plan(cfg)
    pairs = p.align_pairs if kind == "align" else p.finetune_pairs
    groups = [k % 2 for k in range(len(pairs))] if getattr(cfg, kind).method == "vaa" else None
    return pairs, groups, side_pairs(getattr(cfg, kind), p)


@pytest.mark.parametrize("kind,method", [("align", "sft"), ("align", "vaa"), ("finetune", "safegrad")])
def test_a_stage_killed_mid_way_resumes_from_its_checkpoint_to_the_same_weights(smoke, tmp_path, monkeypatch, kind,
                                                                                  method):
    cfg = smoke(f"{kind}.method={method}", f"{kind}.checkpoint_every=2", f"{kind}.epochs=1", "tracking.enabled=false")
    base = base_model(cfg)
    pairs, groups, side = stage_inputs(cfg, kind)
    ref_cfg = replace(cfg, output_dir=str(tmp_path / "uninterrupted"))
    reference = train_stage(ref_cfg, kind, base, pairs, Tracker(ref_cfg), lambda _: None, groups=groups, side=side)

    save = Checkpoint.maybe_save

    def save_then_crash(self, step, *args):
        save(self, step, *args)
        if step == 5:
            raise Crash(step)

    monkeypatch.setattr(Checkpoint, "maybe_save", save_then_crash)
    out = Path(cfg.output_dir)
    with pytest.raises(Crash):
        train_stage(cfg, kind, base, pairs, Tracker(cfg), lambda _: None, groups=groups, side=side)
    assert finished(out, kind) == []  # nothing half-trained reads as finished
    (ckpt,) = out.glob(f".ckpt-{kind}-*")
    assert [d.name for d in ckpt.iterdir()] == ["step-0000004"]  # the latest whole checkpoint only

    monkeypatch.setattr(Checkpoint, "maybe_save", save)
    logs: list[str] = []
    resumed = train_stage(cfg, kind, base, pairs, Tracker(cfg), logs.append, groups=groups, side=side)
    assert any("continuing from step 4" in line for line in logs), logs
    assert Path(resumed).name == Path(reference).name  # the same stage key
    mine, theirs = weights(resumed), weights(reference)
    assert mine.keys() == theirs.keys() and mine
    assert all(torch.equal(mine[k], theirs[k]) for k in mine), "the resumed stage's weights differ"
    assert not ckpt.exists()  # a finished stage drops its checkpoints


def test_a_nan_stops_the_stage_naming_stage_step_and_method_and_keeps_the_last_checkpoint(smoke, monkeypatch):
    import hftlab.algorithms.sft as sft  # the SFT step the records build (training/method.build_sft)

    cfg = smoke("align.checkpoint_every=2", "tracking.enabled=false")
    base = base_model(cfg)
    pairs, groups, side = stage_inputs(cfg, "align")
    real_step, calls = sft.sft_step, []

    def poisoned(model, batch, engine, **kwargs):  # our own step, poisoned at its 5th call: a weight turns NaN
        calls.append(1)
        if len(calls) == 5:
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).view(-1)[0] = float("nan")
        return real_step(model, batch, engine, **kwargs)

    monkeypatch.setattr(sft, "sft_step", poisoned)
    with pytest.raises(NonFiniteError) as err:
        train_stage(cfg, "align", base, pairs, Tracker(cfg), lambda _: None, groups=groups, side=side)
    message = str(err.value)
    assert message.startswith("align (sft): ") and "at optimizer step 5" in message and "nan" in message, message
    assert "\n" not in message and "no stage output was written" in message
    out = Path(cfg.output_dir)
    assert finished(out, "align") == []
    (ckpt,) = out.glob(".ckpt-align-*")
    assert str(ckpt) in message
    kept = load_file(str(ckpt / "step-0000004" / "weights.safetensors"))
    assert all(torch.isfinite(t).all() for t in kept.values())  # the last good weights


def test_an_unwritable_output_dir_fails_before_any_work(smoke, tmp_path):
    from hftlab.run.pipeline import run

    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the output directory should be")
    cfg = smoke(f"output_dir={blocked / 'outputs'}", "tracking.enabled=false")
    with pytest.raises(ConfigError) as err:
        run(cfg, log=lambda _: None)
    assert err.value.field == "output_dir" and str(blocked / "outputs") in str(err.value)
    assert blocked.read_text() == "a file where the output directory should be"


RACE = """
import sys, time
from pathlib import Path
from hftlab.config import load_config
from hftlab.run.inputs import plan
from hftlab.run.stages import base_model, train_stage
from hftlab.tracking.logger import Tracker
cfg = load_config(sys.argv[1], sys.argv[3:])
base = base_model(cfg)
p = plan(cfg)
while not Path(sys.argv[2]).exists():  # both start training at once
    time.sleep(0.01)
print("STAGE", train_stage(cfg, "align", base, p.align_pairs, Tracker(cfg)), flush=True)
"""


def test_two_processes_racing_for_one_stage_train_it_once(smoke, tmp_path, tiny_cache):
    cfg = smoke()
    base_model(cfg)  # the tiny base built once beforehand, so both racers reach the stage at the same time
    go = tmp_path / "go"
    overrides = [f"output_dir={cfg.output_dir}", f"cache_dir={tiny_cache}", "tracking.enabled=false", "threads=1",
                 "align.epochs=1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(REPO / "configs" / "smoke.yaml"), str(go), *overrides],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for _ in range(2)]
    time.sleep(8)  # both loaded and waiting at the barrier
    go.write_text("go")
    logs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], logs
    trained = [log for log in logs if "[align] sft:" in log]
    reused = [log for log in logs if "[align] reusing" in log]
    assert len(trained) == 1 and len(reused) == 1, logs
    assert "[lock] waiting for align-" in reused[0]  # it waited for the other one, then reused its stage
    stages = {line.split()[1] for log in logs for line in log.splitlines() if line.startswith("STAGE")}
    assert len(stages) == 1 and finished(Path(cfg.output_dir), "align") == [Path(stages.pop())]


def _run(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "hftlab.cli", "run", str(REPO / "configs" / "smoke.yaml"), *args],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=log.parent)


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    end = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def _metrics(uri: str) -> dict:
    import mlflow

    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    return {"status": run.info.status, "id": run.info.run_id, "metrics": run.data.metrics}


STAGE_KEYS = ("base.hs", "aligned.hs", "finetuned.hs", "finetuned.fa", "aligned.fa", "align.final_loss")


def test_a_killed_driver_reruns_to_an_uninterrupted_runs_metrics(tmp_path, tiny_cache):
    """SIGKILL by PID during alignment, then during evaluation; each rerun of the same command resumes."""
    common = [f"cache_dir={tiny_cache}", "align.checkpoint_every=3", "align.epochs=2", "finetune.epochs=1"]
    ref_dir = tmp_path / "uninterrupted"
    ref_dir.mkdir()
    ref_uri = f"sqlite:///{ref_dir / 'mlflow.db'}"
    ref = _run([*common, f"output_dir={ref_dir / 'outputs'}", f"tracking.tracking_uri={ref_uri}"], ref_dir / "log")
    assert ref.wait(timeout=600) == 0, (ref_dir / "log").read_text()
    expected = _metrics(ref_uri)["metrics"]

    work = tmp_path / "killed"
    work.mkdir()
    out, uri = work / "outputs", f"sqlite:///{work / 'mlflow.db'}"
    args = [*common, f"output_dir={out}", f"tracking.tracking_uri={uri}"]
    # 1. killed during alignment, once a checkpoint exists
    proc = _run(args, work / "log1")
    _wait_for(lambda: any(out.glob(".ckpt-align-*/step-*/state.pt")), proc, "an alignment checkpoint")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert finished(out, "align") == []
    # 2. rerun: alignment resumes from its checkpoint; killed again while the aligned model is evaluated
    proc = _run(args, work / "log2")
    _wait_for(lambda: "[eval] generating" in (work / "log2").read_text().split("[align] done")[-1]
              and "[align] done" in (work / "log2").read_text(), proc, "the aligned model's evaluation")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    log2 = (work / "log2").read_text()
    assert "[resume] .ckpt-align-" in log2 and "continuing from step" in log2
    assert int(log2.split("continuing from step ")[1].split()[0]) > 0
    assert "continuing MLflow run" in log2  # the first driver's run, left RUNNING, is taken up
    (aligned,) = finished(out, "align")
    mtime = (aligned / "model.safetensors").stat().st_mtime_ns if (aligned / "model.safetensors").is_file() else None
    # 3. rerun to the end: the aligned stage reused, not retrained; the metrics equal the uninterrupted run's
    proc = _run(args, work / "log3")
    assert proc.wait(timeout=600) == 0, (work / "log3").read_text()
    log3 = (work / "log3").read_text()
    assert "[align] reusing" in log3 and "[align] sft:" not in log3
    if mtime is not None:
        assert (aligned / "model.safetensors").stat().st_mtime_ns == mtime
    got = _metrics(uri)  # one run: the rerun continued the killed drivers' run, and it ended
    assert got["status"] == "FINISHED"
    assert_same_metrics(got["metrics"], expected)


def assert_same_metrics(got: dict, expected: dict) -> None:
    """Every metric of an uninterrupted run, equal (NaN equal to NaN), but wall time and memory, which differ."""
    timing = ("seconds", "rss")
    keys = sorted(k for k in expected if not any(t in k for t in timing))
    assert set(STAGE_KEYS) <= set(keys) and sorted(k for k in got if not any(t in k for t in timing)) == keys
    for key in keys:
        a, b = got[key], expected[key]
        assert a == b or (a != a and b != b), (key, a, b)


def _mlflow_server(tmp_path: Path, port: int, log_name: str) -> subprocess.Popen:
    from .conftest import wait_healthy

    log = tmp_path / log_name
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    wait_healthy(f"http://127.0.0.1:{port}", proc, log, "mlflow server")
    return proc


def test_mlflow_stopped_mid_run_and_restarted_ends_up_with_every_metric(smoke, tmp_path):
    import mlflow

    from hftlab.run.pipeline import run

    from .conftest import free_port, stop_group

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = {"proc": _mlflow_server(tmp_path, port, "server-1.log")}
    cfg = smoke(f"tracking.tracking_uri={url}", "align.epochs=2", "finetune.epochs=1")
    logs: list[str] = []

    def on_stage(stage: str, _summary: dict) -> None:
        if stage == "base":  # gone for the whole alignment and its evaluation
            stop_group(server["proc"])
        elif stage == "aligned":
            server["proc"] = _mlflow_server(tmp_path, port, "server-2.log")

    try:
        summary = run(cfg, log=logs.append, on_stage=on_stage)
    finally:
        stop_group(server["proc"])
    server["proc"] = _mlflow_server(tmp_path, port, "server-3.log")
    try:
        client = mlflow.MlflowClient(url)
        got = client.get_run(summary["run_id"])
        steps = [m.step for m in client.get_metric_history(summary["run_id"], "align.loss")]
    finally:
        stop_group(server["proc"])
    assert any("[tracking] MLflow at" in line and "failed" in line for line in logs), logs
    assert any("is back" in line for line in logs) or summary["tracking_delayed"] == 0
    assert summary["tracking_delayed"] == 0
    assert got.info.status == "FINISHED"
    total = int(got.data.metrics["align.steps"])
    assert steps == list(range(10, total + 1, 10)) and steps  # every step logged while the server was away
    for stage in ("base", "aligned", "finetuned"):
        for key in ("hs", "fa", "hs_lo", "hs_hi"):
            assert got.data.metrics[f"{stage}.{key}"] == pytest.approx(summary[stage][key]), (stage, key)
    assert "aligned.peak_rss_gb" in got.data.metrics
    assert not (Path(cfg.output_dir) / "tracking-outbox").exists() or not any(
        (Path(cfg.output_dir) / "tracking-outbox").iterdir())


def test_mlflow_unreachable_at_start_stops_at_once_or_logs_locally(smoke, tmp_path):
    from hftlab.run.pipeline import run
    from hftlab.tracking.logger import Tracker

    from .conftest import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = smoke(f"tracking.tracking_uri={url}")
    started = time.time()
    with pytest.raises(ConfigError) as err:
        run(cfg, log=lambda _: None)
    assert err.value.field == "tracking.tracking_uri" and url in str(err.value) and "on_error=local" in str(err.value)
    assert time.time() - started < 60 and not any(Path(cfg.output_dir).glob("align-*"))
    logs: list[str] = []
    local = smoke(f"tracking.tracking_uri={url}", "tracking.on_error=local")
    with Tracker(local, run_name="local", log=logs.append) as tracker:
        tracker.metrics({"x": 1.0})
    assert tracker.uri.startswith("sqlite:///") and tracker.uri.endswith("mlflow-local.db")
    assert any("not reachable" in line and "tracking.on_error=local" in line for line in logs)
    import mlflow

    assert mlflow.MlflowClient(tracker.uri).get_run(tracker.run_id).data.metrics == {"x": 1.0}


def test_a_tracking_uri_password_is_never_a_param_nor_printed(smoke, mlflow_server, capsys):
    import mlflow

    from hftlab.run.pipeline import format_summary
    from hftlab.tracking.logger import Tracker

    secret_uri = mlflow_server.replace("http://", "http://alice:s3cr3t-pw@")  # the server ignores the credentials
    cfg = smoke(f"tracking.tracking_uri={secret_uri}")
    logs: list[str] = []
    with Tracker(cfg, run_name="secret", log=logs.append) as tracker:
        tracker.metrics({"x": 1.0})
    run = mlflow.MlflowClient(mlflow_server).get_run(tracker.run_id)
    assert run.data.params["tracking.tracking_uri"] == mlflow_server.replace("http://", "http://alice:***@")
    assert not any("s3cr3t-pw" in str(v) for v in [*run.data.params.values(), *run.data.tags.values(), *logs])
    text = format_summary(cfg, {"run_id": tracker.run_id, "tracking_uri": secret_uri})
    assert "s3cr3t-pw" not in text and "alice:***@" in text
