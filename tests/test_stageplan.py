"""`hftlab plan`: stages, sharing and costs of configs and sweeps, before anything runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from hftlab.config import ConfigError
from hftlab.plan.costs import ACCELERATORS, TRAIN_MFU
from hftlab.plan.estimate import check_cluster, make_plan
from tests.conftest import REPO

PAPER = "configs/paper/beavertails-sst2-llama2.yaml"


def test_a_sweeps_shared_stages_are_counted_as_worked_out_by_hand():
    """table1-tasks: 5 methods x 4 tasks x 3 seeds = 60 trials. Distinct: 1 base; 15 alignments (method x seed, the
    task does not enter) + 3 stage-1 SFT alignments (VAA resets its own settings, and the quickstart's
    `align.vaa.update_on_perturbed: false` makes them differ from the SFT arm's, as in the pipeline's cache keys);
    3 proxies and 3 group stages (one per seed); 60 fine-tunings; 4 base evaluations (one per task's test set), 60
    aligned and 60 fine-tuned ones. Needed: 6 per trial + 3 more for each of the 12 VAA trials."""
    plan = make_plan(REPO / "configs/sweeps/table1-tasks.yaml")
    assert len(plan["trials"]) == 60
    assert plan["stages_needed"] == 60 * 6 + 12 * 3
    assert plan["stages_unique"] == 1 + 18 + 3 + 3 + 60 + 4 + 60 + 60
    top = plan["shared"][0]
    assert top["kind"] == "base" and top["trials"] == 60
    assert plan["resources"] == {"cpu": 1.0, "gpu": 0.0}


def test_the_paper_configs_costs_follow_the_stated_formulas():
    """Alignment on Llama-2-7B (6.74B) under LoRA: 4 N FLOPs per token x 5000 pairs x 20 epochs x 256 tokens, at
    TRAIN_MFU of an H100's 989 TFLOPS."""
    plan = make_plan(REPO / PAPER, accelerator="h100")
    (trial,) = plan["trials"]
    align = next(s for s in trial["stages"] if s["kind"] == "align")
    by_hand = 4 * 6.74e9 * 5000 * 20 * 256 / (989e12 * TRAIN_MFU) / 3600
    assert align["gpu_hours"] == pytest.approx(by_hand, rel=1e-9) and align["examples"] == 5000
    evals = [s for s in trial["stages"] if s["kind"].startswith("eval")]
    assert [s["examples"] for s in evals] == [1000 + 872] * 3  # HS prompts + SST2 test rows, each stage
    assert plan["gpu_hours"] == pytest.approx(sum(s["gpu_hours"] for s in trial["stages"]))
    # a slower accelerator costs more hours for the same plan
    assert make_plan(REPO / PAPER, accelerator="a100")["gpu_hours"] > plan["gpu_hours"]
    # VAA adds its stage 1 (SFT alignment, proxy, matrix) and a proxy that trains every weight: Adam states of 7B
    vaa = make_plan(REPO / PAPER, ["align.method=vaa"])
    assert {s["kind"] for s in vaa["trials"][0]["stages"]} >= {"proxy", "groups"}
    assert vaa["peak_memory_gb"] > ACCELERATORS["h100"].memory_gb
    # groups.method=loss: the same rows, one forward pass each, nothing decoded or judged: stage 1's matrix is cheaper
    loss = make_plan(REPO / PAPER, ["align.method=vaa", "groups.method=loss"])
    matrix = {name: next(s for s in p["trials"][0]["stages"] if s["kind"] == "groups") for name, p in
              (("gen", vaa), ("loss", loss))}
    assert matrix["loss"]["examples"] == matrix["gen"]["examples"] and matrix["loss"]["decode_tokens"] == 0
    assert matrix["loss"]["gpu_hours"] < matrix["gen"]["gpu_hours"]


def test_plan_loads_no_model_and_imports_no_torch():
    code = ("import sys; from hftlab.cli import main; rc = main(['plan', '" + PAPER + "', '--json']); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'imported'; sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["trials"][0]["stages"][0]["model"] == "meta-llama/Llama-2-7b-hf"


def test_an_unknown_model_or_accelerator_stops_with_the_field():
    with pytest.raises(ConfigError, match=r"^base.name_or_path='org/unknown-7b'.*no known size"):
        make_plan(REPO / PAPER, ["base.name_or_path=org/unknown-7b"])
    with pytest.raises(ConfigError, match=r"^accelerator='tpu'"):
        make_plan(REPO / PAPER, accelerator="tpu")


def test_a_cluster_without_gpus_is_told_what_it_lacks(ray_local):
    """Against a real local Ray instance (2 CPUs, no GPU): a GPU plan does not fit, a CPU plan does."""
    resources = ray_local.cluster_resources()
    plan = make_plan(REPO / PAPER, accelerator="h200")
    assert check_cluster(plan, resources, need_gpu=1, need_cpu=1) == "the cluster has 0 GPU, a trial of this plan needs 1"
    assert check_cluster(make_plan(REPO / "configs/smoke.yaml"), resources, need_gpu=0, need_cpu=2) is None
    assert "needs 8" in check_cluster(plan, resources, need_gpu=0, need_cpu=8)
    vaa = make_plan(REPO / PAPER, ["align.method=vaa"], accelerator="h100")
    assert "GB on one GPU" in check_cluster(vaa, {"GPU": 8, "CPU": 64}, need_gpu=1, need_cpu=1)


PAPER_FILES = sorted([*(REPO / "configs/paper").glob("*.yaml"), *(REPO / "configs/sweeps/paper").glob("*.yaml")])


@pytest.mark.parametrize("path", PAPER_FILES, ids=lambda p: p.name)
def test_every_paper_config_and_sweep_plans_and_cites_its_reference(path):
    """Each paper-scale file loads, validates every trial and plans on CPU; its header names the reference scripts
    (repository@commit and file:line) it follows."""
    plan = make_plan(path, accelerator="h200")
    assert plan["trials"] and plan["gpu_hours"] > 0
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    assert re.search(r"[\w-]+/[\w-]+[ ]?@[ ]?[0-9a-f]{7}", header), f"{path.name}: no repository@commit"
    assert re.search(r"\.(sh|py):L\d+", header), f"{path.name}: no file:line citation"


def test_the_real_lanes_sweeps_plan_without_a_hub_and_share_their_alignments():
    """configs/sweeps/real-operating-point.yaml (the search) and real-comparison.yaml (the defenses x p x seeds) load,
    validate every trial against ../shared/data and plan with no model loaded: 8 trials on 2 alignments, each trained
    once for its 4 attacks; 27 trials where SFT and SFT + SafeGrad share one SFT-aligned model per seed."""
    search = make_plan(REPO / "configs/sweeps/real-operating-point.yaml")
    assert len(search["trials"]) == 8
    align = {s["key"] for t in search["trials"] for s in t["stages"] if s["kind"] == "align"}
    assert len(align) == 2
    comparison = make_plan(REPO / "configs/sweeps/real-comparison.yaml")
    assert len(comparison["trials"]) == 27
    by_trial = [{s["kind"]: s["key"] for s in t["stages"] if s["kind"] in ("align", "judge")} for t in comparison["trials"]]
    assert len({t["judge"] for t in by_trial}) == 1  # the corpus judge, trained once
    arms = [t["name"] for t in comparison["trials"]]
    sft_aligned = {b["align"] for b, name in zip(by_trial, arms, strict=True) if name.startswith("sft+")}
    assert len(sft_aligned) == 3  # one per seed: SFT's and SafeGrad's 6 trials per seed fine-tune the same model
