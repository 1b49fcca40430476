"""The report's paired differences: each method against the baseline row on the same prompts and seeds.

For every column of a layout (a task, a poison ratio, ...), the runs of a method and of the baseline (the row named
`sft+sft` if there is one, else the first row) are paired by seed; their per-prompt verdicts after fine-tuning (the
run artifact `verdicts/finetuned.json`) are resampled jointly over prompts and seeds (stats.paired_bootstrap), which
gives HS(method) - HS(baseline) with a 95% interval. The power line beside it: the smallest HS difference that many
prompts x seeds, with the runs' judge (its measured sensitivity and specificity, `judge.*` metrics), detects at 80%.
Runs without the artifact (logged before it existed) are left out and counted.
"""

from __future__ import annotations

import json
import statistics

from hftlab.stats import min_detectable_difference, paired_bootstrap
from hftlab.tracking import client as tracking

SEED_KEYS = ("seed", "base.tiny.seed")


def baseline_of(rows: list[str]) -> str:
    named = [r for r in rows if r.split()[0] == "sft+sft"]
    return named[0] if named else rows[0]


def verdicts(uri: str, run: dict, cache: dict) -> list[int] | None:
    if run["run_id"] not in cache:
        text = tracking.read_artifact_text(uri, run["run_id"], "verdicts/finetuned.json")
        cache[run["run_id"]] = json.loads(text) if text is not None else None
    return cache[run["run_id"]]


def paired_section(uri: str, runs: list[dict], key: str, row_of: list[str]) -> str:
    """Markdown: per column of `key`, each row against the baseline row, paired over prompts and seeds."""
    rows = sorted(set(row_of))
    if len(rows) < 2:
        return ""
    base, cache, missing = baseline_of(rows), {}, 0
    lines = [f"Paired HS difference after fine-tuning against `{base}` (points; 95% bootstrap interval over the same "
             "prompts and seeds), and the smallest difference the design detects at 80% power.", "",
             f"| {key} | method | HS | {base} HS | difference | 95% CI | seeds x prompts | detectable |",
             "|---|---|---|---|---|---|---|---|"]
    columns = sorted({r["params"].get(key) for r in runs}, key=lambda v: (str(type(v)), v))
    for column in columns:
        by_row: dict[str, dict] = {}
        for run, row in zip(runs, row_of, strict=True):
            if run["params"].get(key) == column:
                by_row.setdefault(row, {})[tuple(run["params"].get(k) for k in SEED_KEYS)] = run
        for row in rows:
            if row == base or row not in by_row or base not in by_row:
                continue
            seeds = sorted(set(by_row[row]) & set(by_row[base]), key=str)
            pairs = [(verdicts(uri, by_row[base][s], cache), verdicts(uri, by_row[row][s], cache)) for s in seeds]
            kept = [(a, b) for a, b in pairs if a is not None and b is not None and len(a) == len(b) and a]
            missing += len(pairs) - len(kept)
            if not kept:
                continue
            diff, lo, hi = paired_bootstrap([a for a, _ in kept], [b for _, b in kept])
            hs = [100 * statistics.fmean(b) for _, b in kept]
            hs_base = [100 * statistics.fmean(a) for a, _ in kept]
            metrics = by_row[row][seeds[0]]["metrics"]
            se, sp = metrics.get("judge.sensitivity", 1.0), metrics.get("judge.specificity", 1.0)
            mdd = min_detectable_difference(len(kept[0][0]), len(kept), min(max(statistics.fmean(hs + hs_base), 1), 99),
                                            se, sp)
            lines.append(f"| {column} | {row} | {statistics.fmean(hs):.1f} | {statistics.fmean(hs_base):.1f} | "
                         f"{diff:+.1f} | [{lo:+.1f}, {hi:+.1f}] | {len(kept)} x {len(kept[0][0])} | {mdd:.1f} |")
    if len(lines) == 4:
        return ""
    if missing:
        lines += ["", f"{missing} run pairs had no per-prompt verdicts (logged before they were) and are left out."]
    return "\n".join(lines) + "\n"
