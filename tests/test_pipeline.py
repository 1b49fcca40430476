"""The main pipeline on the toy world: the HFT phenomenon itself, tracking, reuse, early failures."""

from __future__ import annotations

import json

import mlflow
import pytest

from hftlab.config import ConfigError, load_config
from hftlab.data.toyworld import build_world
from hftlab.run.pipeline import plan, run
from tests.conftest import REPO


@pytest.mark.slow
def test_alignment_lowers_hs_and_harmful_finetuning_raises_it(smoke, tmp_path):
    safe = tmp_path / "safe.jsonl"  # over-refusal prompts: the toy world's own benign task prompts
    world = build_world(load_config(REPO / "configs" / "smoke.yaml").data.toy)
    safe.write_text("".join(json.dumps({"prompt": t.prompt}) + "\n" for t in world.task_test["sst2"][:12]))
    cfg = smoke("seed=0", "finetune.poison_ratio=0.1", f"eval.refusal_sets=[{safe}]")
    summary = run(cfg, log=lambda *_: None)
    base, aligned, tuned = (summary[s] for s in ("base", "aligned", "finetuned"))
    # measured at this seed: 100 -> 0 -> 100 (docs/toy-world.md); margins leave room for float noise
    assert base["hs"] >= 80.0
    assert aligned["hs"] <= 20.0 and aligned["hs"] <= base["hs"] - 60.0
    assert tuned["hs"] >= aligned["hs"] + 50.0
    assert tuned["fa"] >= 80.0  # the user's task was learned too
    for s in (base, aligned, tuned):  # HS's interval over its prompts; the toy world has no labels to correct it by
        assert s["hs_lo"] <= s["hs"] <= s["hs_hi"] and s["hs_corrected"] != s["hs_corrected"]
        assert sum(s["verdicts"]) == pytest.approx(s["hs"] * len(s["verdicts"]) / 100)
        assert s["refusal_lo"] <= s["refusal"] <= s["refusal_hi"] and s["refusal_sets"]["safe"]["prompts"] == 12

    # the run is in MLflow with HS/FA per stage, dotted params and the artifacts
    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    got = mlflow.get_run(summary["run_id"])
    assert got.info.status == "FINISHED"
    for stage in ("base", "aligned", "finetuned"):
        assert got.data.metrics[f"{stage}.hs"] == pytest.approx(summary[stage]["hs"])
        assert got.data.metrics[f"{stage}.fa"] == pytest.approx(summary[stage]["fa"])
        assert got.data.metrics[f"{stage}.hs_hi"] == pytest.approx(summary[stage]["hs_hi"])
        assert got.data.metrics[f"{stage}.refusal"] == pytest.approx(summary[stage]["refusal"])
    assert got.data.params["finetune.poison_ratio"] == "0.1"
    assert got.data.params["base.tiny.hidden_size"] == "96"
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(summary["run_id"])}
    assert {"config", "samples", "model"} <= arts
    samples = json.loads(mlflow.artifacts.load_text(f"{got.info.artifact_uri}/samples/finetuned.json"))
    assert "harmful_or_correct" in samples["columns"]

    # a rerun reuses every stage (same keys) and gives the same numbers
    again = run(cfg, log=lambda *_: None)
    same = [json.dumps({s: run_[s] for s in ("base", "aligned", "finetuned")}, sort_keys=True) for run_ in (again, summary)]
    assert same[0] == same[1]  # as JSON: the uncorrected toy HS is nan, and nan != nan
    assert again["dirs"] == summary["dirs"]


def test_poison_ratio_and_bad_data_fail_before_training(smoke, tmp_path):
    with pytest.raises(ConfigError, match=r"^finetune.poison_ratio=1.7"):
        smoke("finetune.poison_ratio=1.7")
    bad = tmp_path / "harmful.jsonl"
    bad.write_text('{"prompt": "how do i rob a bank?", "is_safe": false}\n')
    cfg = smoke("data.world=real", "base.name_or_path=some/model", "align.n_benign=0",
                f"data.alignment_source={bad}", f"data.harmful_source={bad}", f"data.harmful_test_source={bad}")
    with pytest.raises(ConfigError) as err:
        plan(cfg)
    assert err.value.field == "data.alignment_source" and "missing field 'response'" in str(err.value)
    # nothing was built or logged: no outputs, no MLflow store
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "mlflow.db").exists()


def test_sizes_are_checked_against_the_data(smoke):
    with pytest.raises(ConfigError, match=r"^finetune.n=100000"):
        plan(smoke("finetune.n=100000"))
    with pytest.raises(ConfigError, match=r"^align.n_alignment=99999"):
        plan(smoke("align.n_alignment=99999"))
    with pytest.raises(ConfigError, match=r"^base.name_or_path='tiny'"):
        plan(smoke("data.world=real", "align.n_benign=0"))


@pytest.mark.slow
def test_every_alignment_method_runs_in_the_pipeline_and_logs_its_stats(smoke):
    """Wiring, not efficacy: each baseline aligns through `hftlab run` with its side data and per-step stats."""
    expect = {"vaccine": "align.perturbed_loss", "booster": "align.harmful_drop", "repnoise": "align.n_backward"}
    for method, metric in expect.items():
        cfg = smoke(f"align.method={method}", "align.epochs=1", "finetune.epochs=1", "eval.n_harmful=20", "eval.n_task=20")
        summary = run(cfg, log=lambda *_: None)
        assert {"base", "aligned", "finetuned"} <= set(summary)
        client = mlflow.MlflowClient(tracking_uri=summary["tracking_uri"])
        assert client.get_metric_history(summary["run_id"], metric), (method, metric)
        assert client.get_run(summary["run_id"]).data.params["align.method"] == method


@pytest.mark.slow
def test_compute_matched_sft_takes_more_steps_and_hs_plus_is_logged(smoke):
    """Controls are config values: compute-matched SFT trains VAA's backward passes in steps; every stage logs
    HS, HS+ (with degenerate answers) and the degenerate rate; the run is named by its label."""
    from hftlab.training.methods import step_budget

    common = ("align.epochs=1", "finetune.epochs=1", "eval.n_harmful=20", "eval.n_task=20")
    cfg = smoke("align.compute_match=vaa", "label=sft-matched", *common)
    summary = run(cfg, log=lambda *_: None)
    got = mlflow.MlflowClient(tracking_uri=summary["tracking_uri"]).get_run(summary["run_id"])
    n_pairs = len(plan(cfg).align_pairs)  # 560 refusals + 150 benign = 710 -> 23 batches of 32
    plain = step_budget(smoke(*common).align, n_pairs)
    assert plain == 23 and got.data.metrics["align.steps"] == step_budget(cfg.align, n_pairs) > plain
    assert got.info.run_name.startswith("sft-matched")
    for stage in ("base", "aligned", "finetuned"):
        m = got.data.metrics
        assert m[f"{stage}.hs"] <= m[f"{stage}.hs_plus"] <= m[f"{stage}.hs"] + m[f"{stage}.degenerate"]


@pytest.mark.slow
def test_lisa_fine_tunes_after_paired_repnoise_in_the_pipeline(smoke):
    """Wiring: RepNoise with the reference's paired data and mask, then Lisa with the plan's alignment pairs, in one
    process; Lisa's phases (alignment 1, fine-tuning 0) and proximal term are logged."""
    cfg = smoke("align.method=repnoise", "align.repnoise.paired=true", "align.repnoise.mask=differ", "align.epochs=1",
                "finetune.method=lisa", "finetune.lisa.alignment_steps=5", "finetune.lisa.finetune_steps=10",
                "finetune.lisa.n_alignment=64", "finetune.epochs=2", "eval.n_harmful=20", "eval.n_task=20")
    summary = run(cfg, log=lambda *_: None)
    client = mlflow.MlflowClient(tracking_uri=summary["tracking_uri"])
    phases = {m.step: m.value for m in client.get_metric_history(summary["run_id"], "finetune.phase")}
    assert phases[10] == 0.0 and phases[20] == 1.0  # steps 1-5 align, 6-15 fine-tune, 16-20 align (every 10th logged)
    assert client.get_metric_history(summary["run_id"], "finetune.proximal")
    assert client.get_metric_history(summary["run_id"], "align.noise_mmd")
