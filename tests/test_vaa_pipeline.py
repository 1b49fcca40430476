"""VAA in the pipeline (single process): groups -> Group DRO + perturbation alignment -> HFT -> eval."""

from __future__ import annotations

import json

import mlflow
import pytest

from hftlab.config import ConfigError
from hftlab.groups.vulnerability import assign
from hftlab.run.pipeline import plan, run, vaa_groups


def test_group_ablations():
    labels = [1, 1, 0, 0, 0, 0, 0, 0, 0, 1]
    assert assign(labels, "true") == labels
    assert assign(labels, "one") == [0] * 10
    assert assign(labels, "vulnerable_only") == [0, 0, None, None, None, None, None, None, None, 0]
    assert assign(labels, "invulnerable_only") == [None, None, 0, 0, 0, 0, 0, 0, 0, None]
    noisy = assign(labels, "noisy", noise=0.2, seed=3)
    assert sum(a != b for a, b in zip(noisy, labels, strict=True)) == 2
    shuffled = assign(labels, "random", seed=3)
    assert sorted(shuffled) == sorted(labels) and shuffled != labels
    assert assign(labels, "random", seed=3) == shuffled  # seeded


def test_a_group_file_missing_examples_fails_before_training(smoke, tmp_path):
    path = tmp_path / "groups.jsonl"
    path.write_text(json.dumps({"id": "not-an-example", "group": 1}) + "\n")
    cfg = smoke("align.method=vaa", f"align.vaa.group_file={path}")
    with pytest.raises(ConfigError, match=r"^align.vaa.group_file=.*has no group for 560 alignment examples"):
        vaa_groups(cfg, plan(cfg))
    with pytest.raises(ConfigError, match=r"^align.vaa.group_file=.*no such file"):
        vaa_groups(smoke("align.method=vaa", f"align.vaa.group_file={tmp_path / 'nope.jsonl'}"), plan(cfg))


@pytest.mark.slow
def test_vaa_pipeline_end_to_end(smoke, ray_local):
    cfg = smoke("align.method=vaa", "align.vaa.rho=0.3")
    summary = run(cfg, log=lambda *_: None)
    assert summary["aligned"]["hs"] <= 20.0  # VAA still aligns the base (100 -> low)
    assert summary["base"]["hs"] >= 80.0
    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    client = mlflow.MlflowClient()
    q1 = client.get_metric_history(summary["run_id"], "align.q_1")
    lam = client.get_metric_history(summary["run_id"], "align.lambda")
    assert q1 and lam and lam[-1].value > lam[0].value  # the curriculum rose; q was tracked per step
    assert "align.final_q_0" in mlflow.get_run(summary["run_id"]).data.metrics
    assert mlflow.get_run(summary["run_id"]).data.params["align.method"] == "vaa"
    plots = [a.path for a in client.list_artifacts(summary["run_id"], "plots")]
    assert plots == ["plots/align-q-and-group-losses.png"]  # q and the group losses over training, as a picture
