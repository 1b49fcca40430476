"""Sweeps: validation before any trial, a real 4-trial Ray Tune sweep logging to a real MLflow server, and a
sweep killed after its first trial that resumes to exactly the planned trials.

Real Ray Tune, real MLflow (server on 127.0.0.1 or SQLite), real training of the smoke-scale toy world,
cut down further by TINY so a trial takes seconds.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from hftlab.cli import main
from hftlab.config import ConfigError
from hftlab.sweep.spec import custom_resources, load_sweep, swept_keys, to_overrides, trial_dotlist, trial_resources
from hftlab.tracking import client as tracking
from tests.conftest import REPO

TINY = ["finetune.n=100", "finetune.epochs=2", "align.epochs=2", "eval.n_harmful=20", "eval.n_task=20"]


def write_sweep(tmp_path: Path, tiny_cache: Path, uri: str | None, name: str, space: dict, **fields) -> Path:
    """A sweep file over configs/smoke.yaml that writes only under tmp_path (uri None: $MLFLOW_TRACKING_URI)."""
    sweep = {"base": str(REPO / "configs" / "smoke.yaml"), "name": name,
             "overrides": [*TINY, f"output_dir={tmp_path / 'outputs'}", f"cache_dir={tiny_cache}",
                           *([f"tracking.tracking_uri={uri}"] if uri else [])],
             "space": space, "storage_path": str(tmp_path / "tune"), **fields}
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"# hftlab sweep {path}\n" + yaml.safe_dump(sweep, sort_keys=False))
    return path


def test_sweep_files_are_checked_before_anything_runs(tmp_path, tiny_cache, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = write_sweep(tmp_path, tiny_cache, uri, "bad", {"finetune.poison_ratio": {"grid": [0.05, 0.2]}})
    spec, fixed = load_sweep(path)
    assert "tracking.experiment=bad" in fixed and "threads=1" in fixed and spec.uses_ray is False

    cases = {  # override -> the field the error must name, and the start of its message
        "sweep.space.align.lrr.grid=[1e-4]": ("space.align.lrr",
                                              "space.align.lrr=0.0001: gives an invalid trial config: align.lrr"),
        "sweep.space.finetune.poison_ratio.grid=[0.1, 1.5]": ("space.finetune.poison_ratio", "space.finetune.poison_ratio=1.5"),
        "sweep.space.seed={grid: []}": ("space.seed", "space.seed={'grid': []}: needs a non-empty list"),
        "sweep.space.align.lr={loguniform: [0, 1]}": ("space.align.lr", "space.align.lr="),
        "sweep.space.method.grid=[{align.method: sft}, {align.method: nope}]": ("space.method",
                                                                                "space.method={'align.method': 'nope'}"),
        "sweep.metric=finetuned.hss": ("metric", "metric='finetuned.hss'"),
        "sweep.scheduler.kind=asha": None,  # valid: ASHA on aligned.hs by default
        "sweep.scheduler.metric=finetuned.hs": ("scheduler.metric", "scheduler.metric='finetuned.hs': must be reported before"),
        "sweep.constraints=[finetuned.fa>80]": ("constraints", "constraints='finetuned.fa>80'"),
        "finetune.nn=3": ("finetune.nn", "finetune.nn=3: unknown key"),
        "sweep.storage_path=s3://bucket/tune": ("storage_path", "storage_path='s3://bucket/tune': is a URI"),
    }
    for override, expected in cases.items():
        if expected is None:
            load_sweep(path, [override])
            continue
        with pytest.raises(ConfigError) as err:
            load_sweep(path, [override])
        assert err.value.field == expected[0] and str(err.value).startswith(expected[1]), (override, str(err.value))

    # the CLI stops with status 2 before Ray or MLflow is touched
    assert main(["sweep", str(path), "sweep.space.align.lrr.grid=[1]"]) == 2
    assert "hftlab: config error: space.align.lrr=1" in capsys.readouterr().err
    assert not (tmp_path / "tune").exists() and not (tmp_path / "mlflow.db").exists()


def test_shipped_sweep_files_validate_and_open_with_their_command():
    files = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))
    assert {f.name for f in files} >= {"vaa-lambda-eta.yaml", "table2-poison-ratio.yaml", "table3-epochs.yaml"}
    for f in files:
        assert f.read_text().splitlines()[0] == f"# hftlab sweep configs/sweeps/{f.name}"
        spec, fixed = load_sweep(f)
        assert spec.space and spec.metric == "finetuned.hs"


def test_trial_values_become_the_cli_dotlist():
    assert to_overrides("align.lr", 1e-4) == ["align.lr=0.0001"]
    assert to_overrides("finetune.task", "sst2") == ["finetune.task=sst2"]
    assert to_overrides("data.template", "1e-4") == ['data.template="1e-4"']  # a string that YAML would read as a number
    assert trial_dotlist({"seed": 1, "method": {"align.method": "vaa", "finetune.method": "sft"}}) == [
        "align.method=vaa", "finetune.method=sft", "seed=1"]


def test_resources_custom_places_a_trial_and_is_no_config_key():
    """A trial's `resources.custom` (tests/data/two-node-sweep.yaml) picks its node; it never reaches the config."""
    spec, fixed = load_sweep(REPO / "tests" / "data" / "two-node-sweep.yaml")
    arms = spec.space["arm"]["grid"]
    assert [trial_dotlist({"arm": a}) for a in arms] == [["finetune.poison_ratio=0.0"], ["finetune.poison_ratio=0.2"]]
    assert [trial_resources(spec, {"arm": a}) for a in arms] == [{"CPU": 1.0, "GPU": 0.0, "worker1": 1.0},
                                                                 {"CPU": 1.0, "GPU": 0.0, "worker2": 1.0}]
    assert custom_resources(spec) == {"worker1", "worker2"} and swept_keys(spec) == ["finetune.poison_ratio"]
    spec, _ = load_sweep(REPO / "tests" / "data" / "two-node-sweep.yaml", ["sweep.resources.custom={gpu_a100: 0.5}"])
    assert trial_resources(spec, {"seed": 1})["gpu_a100"] == 0.5  # the sweep's own, for trials without one
    spec, _ = load_sweep(REPO / "tests" / "data" / "two-node-sweep.yaml",
                         ["sweep.space.resources.custom.grid=[{worker1: 1}, {worker2: 1}]"])  # an axis of its own
    assert swept_keys(spec) == ["finetune.poison_ratio"] and trial_dotlist({"resources.custom": {"worker1": 1}}) == []
    assert trial_resources(spec, {"resources.custom": {"worker2": 1}})["worker2"] == 1.0
    for override, field in {"sweep.resources.custom={CPU: 1}": "resources.custom",
                            "sweep.space.resources.custom.grid=[{worker1: 0}]": "space.resources.custom",
                            "sweep.space.resources.custom.uniform=[0, 1]": "space.resources.custom",
                            "sweep.space.arm.grid=[{seed: 1, resources.custom: {w: -1}}]": "space.arm.resources.custom"}.items():
        with pytest.raises(ConfigError) as err:
            load_sweep(REPO / "tests" / "data" / "two-node-sweep.yaml", [override])
        assert err.value.field == field, (override, str(err.value))


@pytest.mark.slow
def test_four_trial_sweep_logs_parent_and_children_to_a_server_and_reports_them(tmp_path, tiny_cache, mlflow_server,
                                                                                 ray_local, monkeypatch):
    from ray.tune import ExperimentAnalysis

    from hftlab.sweep.runner import run_sweep

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # the server is found the way a cluster job finds it
    space = {"finetune.poison_ratio": {"grid": [0.05, 0.3]}, "seed": {"grid": [0, 1]}}
    path = write_sweep(tmp_path, tiny_cache, None, "grid4", space, max_concurrent_trials=2, constraints=["finetuned.fa>=0"])
    result = run_sweep(path)
    assert (result["trials"], result["errors"], result["interrupted"]) == (4, 0, False)
    assert result["tracking_uri"] == mlflow_server

    client = mlflow.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("grid4")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == result["parent_run_id"]]
    assert [p.info.run_id for p in parents] == [result["parent_run_id"]] and len(children) == 4
    assert parents[0].info.status == "FINISHED" and parents[0].data.tags["hftlab.role"] == "sweep"
    trial_ids = {t.trial_id for t in ExperimentAnalysis(result["path"]).trials}
    assert {c.data.tags["ray.trial_id"] for c in children} == trial_ids and len(trial_ids) == 4
    points = set()
    for c in children:
        assert c.info.status == "FINISHED"
        assert {"finetuned.hs", "finetuned.fa", "aligned.hs", "aligned.fa", "base.hs"} <= set(c.data.metrics)
        assert c.data.tags["hftlab.git_commit"] == tracking.git_commit() and len(c.data.tags["hftlab.config_hash"]) == 12
        assert c.data.tags["ray.job_id"] and c.data.params["tracking.experiment"] == "grid4"
        points.add((c.data.params["finetune.poison_ratio"], c.data.params["seed"]))
    assert points == {("0.05", "0"), ("0.05", "1"), ("0.3", "0"), ("0.3", "1")}

    # the best trial's fine-tuned model is in the registry, with its HS/FA as tags
    version = client.get_model_version_by_alias("hftlab-grid4", "best")
    best = client.get_run(version.run_id)
    assert best.data.metrics["finetuned.hs"] == min(c.data.metrics["finetuned.hs"] for c in children)
    assert float(version.tags["hs"]) == best.data.metrics["finetuned.hs"]
    assert float(version.tags["fa"]) == best.data.metrics["finetuned.fa"]
    files = {f.path for f in client.list_artifacts(best.info.run_id, "model/finetuned")}
    assert "model/finetuned/model.safetensors" in files and version.source.endswith("/model/finetuned")

    # `hftlab report` reads the same runs back: every cell is the mean ± std of those metrics
    out = tmp_path / "report"
    assert main(["report", "grid4", "--out", str(out)]) == 0  # $MLFLOW_TRACKING_URI again
    cells = {r["column"]: r for r in csv.DictReader(open(out / "table-p.csv"))}
    md = (out / "table-p.md").read_text()
    assert set(cells) == {"0.05", "0.3"}
    for p, cell in cells.items():
        hs = [c.data.metrics["finetuned.hs"] for c in children if c.data.params["finetune.poison_ratio"] == p]
        fa = [c.data.metrics["finetuned.fa"] for c in children if c.data.params["finetune.poison_ratio"] == p]
        assert float(cell["hs_mean"]) == pytest.approx(statistics.fmean(hs))
        assert float(cell["hs_std"]) == pytest.approx(statistics.pstdev(hs))
        assert float(cell["fa_mean"]) == pytest.approx(statistics.fmean(fa))
        assert cell["n"] == "2" and cell["method"] == "sft+sft"
        assert f"{statistics.fmean(hs):.1f} ± {statistics.pstdev(hs):.1f}" in md
    assert {"report/table-p.md", "report/table-p.csv", "report/hs-vs-p.png"} <= {
        a.path for a in client.list_artifacts(result["parent_run_id"], "report")}


def test_two_concurrent_trials_share_one_aligned_model_trained_once(tmp_path, tiny_cache, ray_local):
    """The grid's way of sharing stages: two trials start at once and need the same aligned model (same seed, two
    poison ratios); one trains it, the other waits on its lock and reuses it (storage.computed_once)."""
    from hftlab.sweep.runner import run_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = write_sweep(tmp_path, tiny_cache, uri, "shared", {"finetune.poison_ratio": {"grid": [0.05, 0.3]}},
                       max_concurrent_trials=2, resources={"cpu": 1}, constraints=["finetuned.fa>=0"])
    result = run_sweep(path)
    assert (result["trials"], result["errors"]) == (2, 0)
    children = tracking.children(uri, "shared", result["parent_run_id"])
    trained = [c for c in children if "align.train_seconds" in c["metrics"]]
    assert len(children) == 2 and len(trained) == 1  # the other trial reused the aligned model
    aligned = [d for d in (tmp_path / "outputs").glob("align-*") if d.is_dir()]
    assert len(aligned) == 1 and not list((tmp_path / "outputs").glob(".align-*.tmp-*"))  # created once, no leftovers
    overlap = [(c["start_time"], c["end_time"]) for c in children]
    assert max(s for s, _ in overlap) < min(e for _, e in overlap)  # the two trials ran at the same time


@pytest.mark.slow
def test_asha_stops_a_trial_whose_alignment_failed_before_it_fine_tunes(tmp_path, tiny_cache, ray_local):
    from hftlab.sweep.runner import run_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # one trial at a time, in grid order: lr 5e-4 aligns (aligned HS 0), lr 1e-7 does not (aligned HS ~ base HS);
    # at ASHA's first rung the second is below the median of the two and is stopped before fine-tuning
    path = write_sweep(tmp_path, tiny_cache, uri, "asha", {"align.lr": {"grid": [5e-4, 1e-7]}},
                       scheduler={"kind": "asha", "metric": "aligned.hs", "mode": "min"})
    result = run_sweep(path)
    runs = {r["params"]["align.lr"]: r for r in tracking.children(uri, "asha", result["parent_run_id"])}
    assert runs["0.0005"]["status"] == "FINISHED" and "finetuned.hs" in runs["0.0005"]["metrics"]
    stopped = runs["1e-07"]
    assert stopped["metrics"]["aligned.hs"] > runs["0.0005"]["metrics"]["aligned.hs"]
    assert stopped["status"] == "KILLED" and "finetuned.hs" not in stopped["metrics"]
    assert result["stopped"] == [stopped["run_id"]] and result["best"]["run_id"] == runs["0.0005"]["run_id"]


def experiment_state(exp_dir: Path) -> dict[str, str]:
    """Trial id -> status as Tune last saved it (its own reader, from another process)."""
    from ray.tune import ExperimentAnalysis

    if not list(exp_dir.glob("experiment_state-*.json")):
        return {}
    try:
        return {t.trial_id: t.status for t in ExperimentAnalysis(str(exp_dir)).trials}
    except Exception:  # noqa: BLE001 - a state file being written; read it again
        return {}


def kill_ray_of(temp_dir: str) -> None:
    """SIGKILL what the killed driver's Ray instance left (workers lead their own process groups):
    every process whose command line names this test's own Ray temp dir."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid != os.getpid() and any(temp_dir in part for part in proc.info["cmdline"] or []):
                proc.kill()
        except psutil.Error:
            pass


@pytest.mark.slow
def test_a_killed_sweep_resumes_to_exactly_the_planned_trials(tmp_path, tiny_cache):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = write_sweep(tmp_path, tiny_cache, uri, "killme", {"seed": {"grid": [0, 1, 2]}}, max_concurrent_trials=2)
    exp_dir = tmp_path / "tune" / "killme"
    ray_tmp = tempfile.mkdtemp(prefix="hfts-", dir="/tmp")  # short (socket paths) and ours alone
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, TUNE_GLOBAL_CHECKPOINT_S="1")
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "hftlab.cli", "sweep", str(path), "--num-cpus", "2"]
    client = mlflow.MlflowClient(uri)

    def children() -> list:
        exp = client.get_experiment_by_name("killme") if (tmp_path / "mlflow.db").exists() else None
        runs = client.search_runs([exp.experiment_id]) if exp else []
        return [r for r in runs if "mlflow.parentRunId" in r.data.tags]

    try:
        with open(tmp_path / "first.log", "w") as log:
            first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.time() + 240
            while True:  # one trial finished (as Tune saved it) and another one mid-pipeline: kill there
                state = experiment_state(exp_dir)
                running = [c for c in children() if c.info.status == "RUNNING"]
                if "TERMINATED" in state.values() and running:
                    break
                assert first.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
                time.sleep(0.3)
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
        kill_ray_of(ray_tmp)
        done_before = {t for t, s in state.items() if s == "TERMINATED"}
        interrupted_run = running[0].info.run_id

        resumed = subprocess.run([*cmd, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    finally:
        kill_ray_of(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)

    final = experiment_state(exp_dir)
    assert len(final) == 3 and set(final.values()) == {"TERMINATED"} and done_before <= set(final)
    kids = children()
    assert len(kids) == 3 and {k.data.tags["ray.trial_id"] for k in kids} == set(final)  # none lost, none repeated
    assert sorted(k.data.params["seed"] for k in kids) == ["0", "1", "2"]
    assert all(k.info.status == "FINISHED" and "finetuned.hs" in k.data.metrics for k in kids)
    assert interrupted_run in {k.info.run_id for k in kids}  # the interrupted trial continued its own run
    for k in kids:
        if k.data.tags["ray.trial_id"] in done_before:  # finished before the kill: never run again
            assert len(client.get_metric_history(k.info.run_id, "finetuned.hs")) == 1
            assert len(client.get_metric_history(k.info.run_id, "base.hs")) == 1
    parents = [r for r in client.search_runs([client.get_experiment_by_name("killme").experiment_id])
               if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"


def test_a_sweep_stopped_before_its_grid_was_created_counts_as_interrupted(tmp_path):
    """Tune creates a grid's trials as slots free up: interrupted after 3 of 8 trials, its result grid holds 4 (3 ended,
    1 stopped). That is an interrupted sweep (resumable, no best model registered), not a finished one of 4 trials."""
    from hftlab.sweep.runner import unfinished

    spec, _ = load_sweep(REPO / "configs" / "sweeps" / "real-operating-point.yaml")
    assert unfinished(spec, ended=4, created=4) and unfinished(spec, ended=7, created=8)
    assert not unfinished(spec, ended=8, created=8)
