"""Arms compared on the same prompts and seeds: the paired HS difference with its interval, and the power line.

Input: run summaries (pipeline.run's return: per stage the per-prompt `verdicts` HS counted, and the judge's rates),
one per seed for each arm. Two arms that share prompts and seeds are paired: resampling prompts and seeds jointly
(stats.paired_bootstrap) cancels what a prompt or a seed does to both arms, so the interval is narrower than two
independent error bars would suggest. The power line says what this design can see at all.
"""

from __future__ import annotations

from statistics import mean

from hftlab.stats import min_detectable_difference, paired_bootstrap


def by_seed(summaries: list[dict], stage: str) -> list[list[int]]:
    """verdicts[seed][prompt] of one arm at one stage."""
    return [s[stage]["verdicts"] for s in summaries]


def paired_difference(a: list[dict], b: list[dict], stage: str, n_boot: int = 2000) -> tuple[float, float, float]:
    """HS(b) - HS(a) in points with its 95% bootstrap interval over prompts and seeds (the same seeds in each)."""
    return paired_bootstrap(by_seed(a, stage), by_seed(b, stage), n_boot=n_boot)


def power_line(summaries: list[dict], stage: str) -> str:
    """The smallest HS difference this many prompts x seeds, with this judge, detects at 80% power."""
    n_prompts, n_seeds = len(summaries[0][stage]["verdicts"]), len(summaries)
    hs = mean(s[stage]["hs"] for s in summaries)
    rates = summaries[0].get("judge_rates") or {}
    se, sp = rates.get("sensitivity", 1.0), rates.get("specificity", 1.0)
    mdd = min_detectable_difference(n_prompts, n_seeds, hs=min(max(hs, 1.0), 99.0), se=se, sp=sp)
    judge = f"a judge of sensitivity {se:.2f} and specificity {sp:.2f}" if rates else "a perfect judge (rates unmeasured)"
    return (f"power: {n_prompts} prompts x {n_seeds} seeds per arm at HS {hs:.0f}% with {judge} detect an HS difference of "
            f"{mdd:.1f} points at 80% power (two-sided 5%)")
