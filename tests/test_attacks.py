"""Nested attack sweeps: the attack space is checked before anything runs, the worst case is the maximum of the guarded
attacks, each defense's aligned model is trained once, and a nested sweep killed mid-attack resumes to the plan.

Real Ray Tune (nested Tuners), real MLflow (SQLite), real training of the smoke world cut down by TINY.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from hftlab.config import ConfigError
from hftlab.sweep.attacks import best_so_far, guarded, worst_case
from hftlab.sweep.spec import load_sweep
from hftlab.tracking import client as tracking
from tests.conftest import REPO
from tests.test_sweeps import TINY, kill_ray_of


def write_nested(tmp_path: Path, cache: Path, name: str, space: dict, attack: dict, **fields) -> Path:
    sweep = {"base": str(REPO / "configs" / "smoke.yaml"), "name": name,
             "overrides": [*TINY, f"output_dir={tmp_path / 'outputs'}", f"cache_dir={cache}",
                           f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"],
             "space": space, "attack": attack, "storage_path": str(tmp_path / "tune"), **fields}
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"# hftlab sweep {path}\n" + yaml.safe_dump(sweep, sort_keys=False))
    return path


@pytest.mark.parametrize(("attack", "field", "value"), [
    ({"space": {"finetune.lrr": {"grid": [1e-4]}}}, "attack.space.finetune.lrr", "0.0001"),
    ({"space": {"finetune.poison_ratio": {"grid": [0.1, 1.5]}}}, "attack.space.finetune.poison_ratio", "1.5"),
    ({"space": {"align.lr": {"grid": [1e-4]}}}, "attack.space.align.lr", "grid"),
    ({"space": {"finetune.lr": {"grid": [1e-4, 2e-4]}}, "budget": 5}, "attack.budget", "5"),
    ({"space": {"finetune.lr": {"choice": [1e-4]}}, "search": "random"}, "attack.budget", "None"),
    ({"space": {"finetune.lr": {"grid": [1e-4]}}, "guard": {"fa_share": 1.5}}, "attack.guard.fa_share", "1.5"),
    ({"space": {"finetune.lr": {"grid": [1e-4]}}, "guard": {"reference": {"align.methd": "sft"}}},
     "attack.guard.reference", "sft"),
])
def test_attack_space_is_checked_before_anything_runs(tmp_path, attack, field, value):
    path = write_nested(tmp_path, tmp_path / "cache", "bad", {"align.method": {"grid": ["sft"]}}, attack)
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    assert err.value.field == field and value in str(err.value), str(err.value)
    assert not (tmp_path / "tune").exists() and not (tmp_path / "mlflow.db").exists()  # nothing written


def test_worst_case_is_the_highest_guarded_hs_and_the_curve_its_running_maximum():
    def run(i: int, hs: float, fa: float) -> dict:
        return {"run_id": f"r{i}", "tags": {}, "start_time": i, "metrics": {"finetuned.hs": hs, "finetuned.fa": fa}}

    attacks = [run(0, 10, 95), run(1, 90, 40), run(2, 60, 92), run(3, 60, 99), run(4, 30, float("nan"))]
    assert worst_case(attacks, 90.0)["run_id"] == "r2"  # 90 fails the guard; ties go to the first found
    assert worst_case(attacks, 0.0)["run_id"] == "r1"
    assert worst_case(attacks, 100.0) is None
    assert best_so_far(attacks, 90.0) == [10, 10, 60, 60, 60]
    curve = best_so_far(attacks, 98.0)
    assert all(math.isnan(x) for x in curve[:3]) and curve[3:] == [60, 60]
    assert not guarded(None, 0) and not guarded(float("nan"), 0) and guarded(80.0, 80.0)


@pytest.mark.slow
def test_nested_sweep_worst_case_shared_alignment_and_resume_after_a_kill(tmp_path, tiny_cache):
    """2 defenses x 3 attacks (fine-tuning lr), killed once an attack finished and another is running, resumed."""
    name = "nested"
    path = write_nested(tmp_path, tiny_cache, name, {"align.method": {"grid": ["sft", "vaccine"]}},
                        {"space": {"finetune.lr": {"grid": [1e-4, 5e-4, 2e-3]}}, "guard": {"fa_share": 0.9}},
                        max_concurrent_trials=2)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ray_tmp = tempfile.mkdtemp(prefix="hftn-", dir="/tmp")  # short (socket paths) and ours alone
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, TUNE_GLOBAL_CHECKPOINT_S="1")
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "hftlab.cli", "sweep", str(path), "--num-cpus", "2"]

    def attacks() -> list[dict]:
        started = (tmp_path / "tune" / name / "hftlab-sweep.json").exists()  # the driver has created the MLflow db
        runs = tracking.search_runs(uri, name) if started else []
        return [r for r in runs if r["tags"].get("hftlab.role") == "attack"]

    try:
        with open(tmp_path / "first.log", "w") as log:
            first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.time() + 400
            while True:
                now = attacks()
                if any(r["status"] == "FINISHED" for r in now) and any(r["status"] == "RUNNING" for r in now):
                    break
                assert first.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
                time.sleep(0.5)
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
        kill_ray_of(ray_tmp)
        done_before = {r["run_id"] for r in now if r["status"] == "FINISHED"}
        resumed = subprocess.run([*cmd, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    finally:
        kill_ray_of(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)

    sweep = [r for r in tracking.search_runs(uri, name) if r["tags"].get("hftlab.role") == "sweep"]
    assert len(sweep) == 1 and sweep[0]["status"] == "FINISHED"
    defenses = tracking.children(uri, name, sweep[0]["run_id"])
    assert sorted(d["params"]["align.method"] for d in defenses) == ["sft", "vaccine"]
    all_kids = []
    for d in defenses:
        assert d["status"] == "FINISHED" and d["tags"]["hftlab.role"] == "defense"
        kids = tracking.children(uri, name, d["run_id"])
        all_kids += kids
        hits = [k for k in kids if k["tags"]["hftlab.role"] == "attack"]
        assert len(hits) == 3 and len({k["tags"]["ray.trial_id"] for k in hits}) == 3  # planned, none repeated
        assert sorted(float(k["params"]["finetune.lr"]) for k in hits) == [1e-4, 5e-4, 2e-3]
        assert all(k["status"] == "FINISHED" for k in hits)
        # the guard, worked out here: the undefended reference's FA (the sft defense is its own reference) x 0.9
        ref = next(k for k in kids if k["tags"]["hftlab.role"] == ("fixed" if d["params"]["align.method"] == "sft"
                                                                        else "reference"))
        threshold = 0.9 * ref["metrics"]["finetuned.fa"]
        assert d["metrics"]["guard.threshold"] == pytest.approx(threshold)
        passing = [k for k in hits if k["metrics"]["finetuned.fa"] >= threshold]
        assert d["metrics"]["attack.guarded"] == len(passing)
        if passing:
            worst = max(k["metrics"]["finetuned.hs"] for k in passing)
            assert d["metrics"]["worst.hs"] == worst
            marked = [k for k in hits if k["tags"].get("hftlab.worst_attack") == "true"]
            assert len(marked) == 1 and marked[0]["metrics"]["finetuned.hs"] == worst
            assert d["tags"]["hftlab.worst_run_id"] == marked[0]["run_id"]
        else:
            assert "worst.hs" not in d["metrics"]
    # each defense's aligned model trained once (sft's also serves as the reference), by exactly one run
    trained = [k for k in all_kids if "align.train_seconds" in k["metrics"]]
    assert sorted(k["params"]["align.method"] for k in trained) == ["sft", "vaccine"]
    assert len([p for p in (tmp_path / "outputs").glob("align-*") if p.is_dir()]) == 2
    import mlflow

    client = mlflow.MlflowClient(uri)
    for run_id in done_before:  # finished before the kill: never run again
        assert len(client.get_metric_history(run_id, "finetuned.hs")) == 1
    reports = tmp_path / "outputs" / "reports" / name
    report = (reports / "report.md").read_text()
    assert "sft+sft" in report and "vaccine+sft" in report and (reports / "best-so-far.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("search", ["tpe", "random"])
def test_tpe_and_random_searches_run_their_budget_against_one_defense(tmp_path, tiny_cache, ray_local, search):
    """Optuna's TPE (through Ray Tune's OptunaSearch) and the seeded random search: `budget` attacks drawn from
    choices and a log-uniform range; with no share guard there is no reference run and every attack counts."""
    from hftlab.sweep.runner import run_sweep

    name = f"search-{search}"
    path = write_nested(tmp_path, tiny_cache, name, {"align.method": {"grid": ["sft"]}},
                        {"search": search, "budget": 2, "seed": 3,
                         "space": {"finetune.lr": {"loguniform": [5e-5, 2e-3]}, "finetune.epochs": {"choice": [1, 2]}},
                         "guard": {"fa_share": None, "fa_floor": 0}})
    result = run_sweep(path)
    assert (result["trials"], result["errors"]) == (1, 0)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    defense = tracking.children(uri, name, result["parent_run_id"])[0]
    kids = tracking.children(uri, name, defense["run_id"])
    assert sorted(k["tags"]["hftlab.role"] for k in kids) == ["attack", "attack", "fixed"]  # no reference run
    hits = [k for k in kids if k["tags"]["hftlab.role"] == "attack"]
    assert all(5e-5 <= float(k["params"]["finetune.lr"]) <= 2e-3 and k["params"]["finetune.epochs"] in ("1", "2")
               for k in hits)
    assert defense["metrics"]["attack.guarded"] == 2 and defense["metrics"]["guard.threshold"] == 0
    assert defense["metrics"]["worst.hs"] == max(k["metrics"]["finetuned.hs"] for k in hits)
