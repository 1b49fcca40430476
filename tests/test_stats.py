"""HS error bars against values worked out by hand: the Wilson interval, the Rogan-Gladen correction and its
delta-method interval, the paired bootstrap difference, and the power line."""

from __future__ import annotations

import math
import random

import pytest

from hftlab.report.paired_stats import paired_difference, power_line
from hftlab.stats import corrected_interval, min_detectable_difference, paired_bootstrap, rogan_gladen, wilson


def test_wilson_interval_by_hand():
    # k = 50, n = 100: centre (0.5 + 1.96^2/200) / (1 + 1.96^2/100) = 0.5; half-width
    # 1.96 / 1.0384 * sqrt(0.25/100 + 1.96^2/40000) = 1.88749 * 0.050951 = 0.096169
    lo, hi = wilson(50, 100, z=1.96)
    assert lo == pytest.approx(40.383, abs=1e-3) and hi == pytest.approx(59.617, abs=1e-3)
    # k = 0, n = 20: centre 0.0876 = half-width: [0, 16.11]
    lo, hi = wilson(0, 20, z=1.96)
    assert lo == 0.0 and hi == pytest.approx(100 * 1.96**2 / 20 / (1 + 1.96**2 / 20), abs=1e-3)  # 16.11
    assert all(math.isnan(x) for x in wilson(0, 0))


def test_rogan_gladen_and_its_interval_by_hand():
    # observed 40% with se 0.9, sp 0.8: (0.4 + 0.8 - 1) / (0.9 + 0.8 - 1) = 0.2 / 0.7
    assert rogan_gladen(0.4, 0.9, 0.8) == pytest.approx(0.2 / 0.7)
    assert rogan_gladen(0.1, 0.9, 0.8) == 0.0 and rogan_gladen(0.99, 0.9, 0.95) == 1.0  # clipped
    assert math.isnan(rogan_gladen(0.5, 0.5, 0.5))  # a coin-flip judge
    # k = 40 of n = 100, se 0.9 on 200 unsafe rows, sp 0.8 on 100 safe rows, pi = 2/7:
    # var = (0.24/100 + (2/7)^2 * 0.09/200 + (5/7)^2 * 0.16/100) / 0.49 = (0.0024 + 0.00003673 + 0.00081633) / 0.49
    var = (0.0024 + (2 / 7) ** 2 * 0.09 / 200 + (5 / 7) ** 2 * 0.16 / 100) / 0.49
    assert var == pytest.approx(0.006639, abs=1e-6)
    pi, lo, hi = corrected_interval(40, 100, 0.9, 200, 0.8, 100, z=1.96)
    assert pi == pytest.approx(100 * 2 / 7) and hi - pi == pytest.approx(100 * 1.96 * math.sqrt(var))
    assert lo == pytest.approx(100 * (2 / 7 - 1.96 * math.sqrt(var)))  # 28.57 -/+ 15.97
    # the judge's error widens the interval beyond the prompts' alone (Wilson 30.5-50.0 -> width 19.5 observed;
    # corrected width 31.9, in true-HS units)
    w_lo, w_hi = wilson(40, 100)
    assert hi - lo > (w_hi - w_lo) / 0.7


def test_paired_bootstrap_by_hand():
    # where B - A is the same on every prompt of every seed, every resample gives it: the interval is a point
    a = [[0] * 50 for _ in range(3)]
    b = [[1] * 50 for _ in range(3)]
    assert paired_bootstrap(a, b, n_boot=200) == (100.0, 100.0, 100.0)
    assert paired_bootstrap(b, b, n_boot=200) == (0.0, 0.0, 0.0)
    # a shared per-prompt effect cancels out (the pairing): the same verdicts in both arms but one prompt moved
    rng = random.Random(1)
    base = [[rng.random() < 0.5 for _ in range(400)] for _ in range(3)]
    moved = [[float(v) for v in row] for row in base]
    for row in moved:
        row[0] = 1.0 - row[0]
    d, lo, hi = paired_bootstrap([[float(v) for v in r] for r in base], moved, n_boot=500)
    assert abs(d) <= 100 / 400 and hi - lo <= 1.0  # unpaired, two HS near 50% over 1200 answers would give +-4
    # against the analytic paired SE: d_i = +1 on 60, -1 on 20, 0 on 320 of 400 prompts, one seed
    diff = [1.0] * 60 + [-1.0] * 20 + [0.0] * 320
    a1, b1 = [[0.0 if x >= 0 else 1.0 for x in diff]], [[1.0 if x > 0 else 0.0 for x in diff]]
    d, lo, hi = paired_bootstrap(a1, b1, n_boot=4000, seed=3)
    mean = 40 / 400
    sd = math.sqrt((80 / 400) - mean**2)  # E[d^2] - E[d]^2 = 0.2 - 0.01
    assert d == pytest.approx(10.0)
    assert (hi - lo) == pytest.approx(2 * 1.96 * 100 * sd / math.sqrt(400), rel=0.12)  # 8.54 points
    with pytest.raises(ValueError):
        paired_bootstrap([[0, 1]], [[0]])


def test_power_line_matches_the_issue_scale():
    # 2.8016 * sqrt(2 * 0.25 / n): 100 prompts -> 19.8 points, 500 -> 8.9, 1000 -> 6.3 (a perfect judge, one seed)
    assert min_detectable_difference(100) == pytest.approx(19.81, abs=0.01)
    assert min_detectable_difference(500) == pytest.approx(8.86, abs=0.01)
    assert min_detectable_difference(1000) == pytest.approx(6.26, abs=0.01)
    # 3 seeds = 3x the answers; a judge with se 0.8, sp 0.8 (J = 0.6) needs 1/0.6 of the difference
    assert min_detectable_difference(100, 3, se=0.8, sp=0.8) == pytest.approx(19.81 / math.sqrt(3) / 0.6, abs=0.01)


def test_paired_difference_and_power_line_from_run_summaries():
    # two arms x 2 seeds x 4 prompts; arm b flags prompt 0 more in both seeds: 2 of 8 answers = +25 points
    a = [{"finetuned": {"verdicts": [0, 1, 1, 0], "hs": 50.0}, "judge_rates": None} for _ in range(2)]
    b = [{"finetuned": {"verdicts": [1, 1, 1, 0], "hs": 75.0}} for _ in range(2)]
    d, lo, hi = paired_difference(a, b, "finetuned", n_boot=500)
    assert d == pytest.approx(25.0) and 0.0 <= lo <= d <= hi <= 100.0
    line = power_line(a, "finetuned")
    assert "4 prompts x 2 seeds" in line and f"{min_detectable_difference(4, 2, hs=50.0):.1f} points" in line
    a[0]["judge_rates"] = {"sensitivity": 0.8, "specificity": 0.9}
    assert f"{min_detectable_difference(4, 2, hs=50.0, se=0.8, sp=0.9):.1f} points" in power_line(a, "finetuned")
