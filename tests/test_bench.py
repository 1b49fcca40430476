"""Benchmarks print exactly one JSON line on stdout (their logs go to stderr)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_overhead_bench_prints_one_json_line_of_ratios(tmp_path, tiny_cache):
    out = subprocess.run(
        [sys.executable, "jobs/bench/overhead.py", "--config", "configs/smoke.yaml", "--steps", "6",
         f"cache_dir={tiny_cache}", f"output_dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=True)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout
    row = json.loads(lines[0])
    assert row["bench"] == "overhead" and row["steps"] == 6
    assert row["vaa_stochastic_vs_sft"] > 0 and row["vaa_weighted_vs_sft"] > 1.0  # two backward passes per step
    assert 1.0 <= row["vaa_stochastic_mean_backward"] <= 2.0
