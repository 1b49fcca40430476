"""Error bars for the Harmful Score: over prompts, for the judge's own error, between arms, and the power of a design.

Why: HS comes from a few hundred prompts and a judge with measured error, so a difference of a few points between two
defenses can be noise. Each function is a textbook formula, small enough to check by hand (tests/test_stats.py does):

- `wilson`: the 95% Wilson score interval of a proportion (HS over n prompts), sound near 0% and 100%.
- `rogan_gladen`: the prevalence corrected for a judge's sensitivity (recall on unsafe) and specificity (1 - FPR on
  safe): (p + sp - 1) / (se + sp - 1), clipped to [0, 1] (Rogan & Gladen 1978).
- `corrected_interval`: that estimate with a delta-method interval widened by the uncertainty of se and sp, which were
  themselves measured on n_pos unsafe and n_neg safe held-out answers (Reiczigel et al. 2010, eq. 3).
- `paired_bootstrap`: the difference between two arms judged on the same prompts and seeds, resampling seeds and
  prompts jointly (the same draws in both arms), percentile interval.
- `min_detectable_difference`: the smallest true HS difference two arms of n prompts x s seeds detect at 80% power
  (two-sided 5%, normal approximation), the judge's error shrinking an observed difference by its Youden index.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from statistics import NormalDist

Z95 = NormalDist().inv_cdf(0.975)


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson interval of k successes in n trials, in % (nan, nan for n = 0)."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo = 0.0 if k == 0 else 100 * max(0.0, centre - half)  # exact at the ends (no float drift past the estimate)
    hi = 100.0 if k == n else 100 * min(1.0, centre + half)
    return lo, hi


def rogan_gladen(p: float, se: float, sp: float) -> float:
    """True prevalence from an observed share `p` (0-1) and a judge's sensitivity and specificity (0-1)."""
    j = se + sp - 1
    if j <= 0:
        return float("nan")  # a judge no better than chance says nothing about the truth
    return min(1.0, max(0.0, (p + sp - 1) / j))


def corrected_interval(k: int, n: int, se: float, n_pos: int, sp: float, n_neg: int,
                       z: float = Z95) -> tuple[float, float, float]:
    """(corrected HS, lower, upper) in %: Rogan-Gladen, its delta-method variance over the prompts' sampling and the
    judge's rates (se measured on n_pos unsafe rows, sp on n_neg safe rows)."""
    if n == 0 or n_pos == 0 or n_neg == 0 or se + sp - 1 <= 0:
        return float("nan"), float("nan"), float("nan")
    p = k / n
    pi = rogan_gladen(p, se, sp)
    var = (p * (1 - p) / n + pi**2 * se * (1 - se) / n_pos + (1 - pi) ** 2 * sp * (1 - sp) / n_neg) / (se + sp - 1) ** 2
    half = z * math.sqrt(var)
    return 100 * pi, 100 * max(0.0, pi - half), 100 * min(1.0, pi + half)


def paired_bootstrap(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], n_boot: int = 2000,
                     seed: int = 0) -> tuple[float, float, float]:
    """(B - A, lower, upper) in % points: `a[s][i]`, `b[s][i]` are verdicts (0/1) of seed s on prompt i in each arm.
    Each resample draws seeds and prompts with replacement, the same draws for both arms."""
    if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b, strict=True)):
        raise ValueError("paired arms need the same seeds and the same prompts")
    if not a or not a[0]:
        return float("nan"), float("nan"), float("nan")
    n_seeds, n = len(a), len(a[0])
    diff = [[yb - ya for ya, yb in zip(x, y, strict=True)] for x, y in zip(a, b, strict=True)]
    observed = 100 * sum(map(sum, diff)) / (n_seeds * n)
    rng = random.Random(seed)
    stats = []
    for _ in range(n_boot):
        seeds = [rng.randrange(n_seeds) for _ in range(n_seeds)]
        prompts = [rng.randrange(n) for _ in range(n)]
        stats.append(100 * sum(diff[s][i] for s in seeds for i in prompts) / (n_seeds * n))
    stats.sort()
    return observed, stats[int(0.025 * n_boot)], stats[min(n_boot - 1, int(0.975 * n_boot))]


def min_detectable_difference(n_prompts: int, n_seeds: int = 1, hs: float = 50.0, se: float = 1.0, sp: float = 1.0,
                              alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true HS difference (% points) two independent arms detect: (z_a/2 + z_b) sqrt(2 p (1-p) / (n s)) / J,
    with p the observed HS share and J = se + sp - 1 the judge's Youden index."""
    j = se + sp - 1
    if n_prompts <= 0 or n_seeds <= 0 or j <= 0:
        return float("nan")
    p = hs / 100
    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
    return 100 * z * math.sqrt(2 * p * (1 - p) / (n_prompts * n_seeds)) / j
