"""Dose-response summaries: HS over a fine-tuning strength grid as one number per seed, and tests across seeds.

On a knife-edge world HS jumps from 0 to 100 within a narrow band of fine-tuning strength, so one grid point
says little about a method. A method is summarised instead by its area under the HS-vs-strength curve,
normalised by the strength range: the mean HS over the range, in HS units (0-100), computed per seed so that
its spread over seeds is known. Learning rates are compared on a log axis, poison ratios and epochs on a
linear one.

Two methods are compared on those per-seed areas with two tests, and a difference "holds" only when both do:
- Welch's t-test (unequal variances, two-sided) on the two sets of areas;
- a paired bootstrap over the seeds both methods ran (resampling seeds, the same draws for both methods): the
  95% interval of the mean difference must exclude 0.
With 3 seeds the bootstrap has only 10 distinct resamples: a difference holds only if every seed agrees in sign
and Welch's test agrees. That is strict on purpose.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LOG_AXES = {"finetune.lr"}


def auc(xs: Sequence[float], ys: Sequence[float], log: bool = False) -> float:
    """Trapezoid area under ys(xs) divided by the x range (so a flat curve at y has area y); one point: that y."""
    if len(xs) != len(ys) or not xs:
        raise ValueError(f"auc needs as many xs as ys, at least one: got {len(xs)} and {len(ys)}")
    order = np.argsort(xs)
    x = np.asarray(xs, dtype=float)[order]
    y = np.asarray(ys, dtype=float)[order]
    if log:
        if (x <= 0).any():
            raise ValueError(f"a log axis needs positive values, got {x.tolist()}")
        x = np.log10(x)
    if len(x) == 1 or x[-1] == x[0]:
        return float(y.mean())
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) / (x[-1] - x[0]))


@dataclass
class Comparison:
    a: str
    b: str
    mean_diff: float
    """mean AUC of a minus mean AUC of b (negative: a has the lower HS)."""
    welch_p: float
    ci_low: float
    ci_high: float
    """95% paired-bootstrap interval of the mean per-seed difference a - b."""
    n_paired: int

    @property
    def holds(self) -> bool:
        """Both tests agree at the 5% level: Welch p < 0.05 and the bootstrap interval excludes 0."""
        return self.welch_p < 0.05 and (self.ci_low > 0 or self.ci_high < 0)


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided Welch t-test p-value; nan with fewer than 2 values a side; 0 or 1 when both sides are constant."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return math.nan
    if np.std(a) == 0 and np.std(b) == 0:
        return 1.0 if np.mean(a) == np.mean(b) else 0.0
    with warnings.catch_warnings():  # one constant side is fine for Welch; scipy warns about its moments anyway
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def paired_bootstrap(diffs: Sequence[float], n_boot: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of `diffs`, resampling them with replacement (a fixed seed)."""
    d = np.asarray(diffs, dtype=float)
    if len(d) == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def compare(a_name: str, a: dict[str, float], b_name: str, b: dict[str, float]) -> Comparison:
    """Compare two methods' per-seed AUCs ({seed: auc}); the bootstrap pairs the seeds both have."""
    shared = sorted(set(a) & set(b))
    low, high = paired_bootstrap([a[s] - b[s] for s in shared])
    return Comparison(a_name, b_name, float(np.mean(list(a.values())) - np.mean(list(b.values()))),
                      welch_p(list(a.values()), list(b.values())), low, high, len(shared))
