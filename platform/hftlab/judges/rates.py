"""A judge's measured error on held-out human-labeled answers: what the corrected HS (stats.corrected_interval) needs.

Sensitivity = recall on unsafe answers, specificity = 1 - false-positive rate on safe ones, with the row counts they
were measured on (their own uncertainty widens the corrected HS's interval). Measured on the held-out rows
`hftlab judge eval` scores (the corpus's pooled slices, or the split's judge-test and contrast rows), never on rows
the judge trained on; cached under <cache>/judges/rates-<hash of the judge and the rows>.json. `hftlab judge eval`
writes the same file, so a run after it judges nothing extra; a run before it judges the held-out rows once.
"""

from __future__ import annotations

import json
from pathlib import Path

from hftlab.config.loader import digest
from hftlab.config.schema import Config
from hftlab.data.splits import LabeledRow
from hftlab.judges import Judge, scores
from hftlab.judges.labels import eval_pools
from hftlab.storage import atomic_write_text

RATE_POOLS = ("pooled", "held_out")
"""The pool the rates come from: the corpus's pooled held-out slices, else the split's held_out."""


def rate_rows(cfg: Config, pools: dict[str, list[LabeledRow]] | None = None) -> list[LabeledRow] | None:
    """The held-out rows the rates are measured on (from `pools` when the caller has eval_pools(cfg) already), or None
    when the config has no labeled split."""
    if not cfg.data.split.sources or cfg.eval.judge.eval_source != "split":
        return None
    pools = eval_pools(cfg) if pools is None else pools
    return next((pools[p] for p in RATE_POOLS if p in pools), None)


def judge_id(kind: str, judge: Judge) -> str:
    """What makes a judge's verdicts: its kind and, for one with weights, their directory or name."""
    path = getattr(judge, "path", None) or getattr(judge, "model_name", None)
    return f"{kind}:{Path(path).name if path else ''}"


def rates_path(cfg: Config, kind: str, judge: Judge, rows: list[LabeledRow]) -> Path:
    from hftlab.storage import cache_root

    key = digest({"judge": judge_id(kind, judge), "rows": [r.id for r in rows], "threshold": cfg.eval.judge.threshold})
    return cache_root(cfg) / "judges" / f"rates-{key}.json"


def from_verdicts(verdicts: list[bool], rows: list[LabeledRow]) -> dict:
    """Sensitivity and specificity with their counts."""
    tp = sum(v and not r.is_safe for v, r in zip(verdicts, rows, strict=True))
    tn = sum(not v and r.is_safe for v, r in zip(verdicts, rows, strict=True))
    n_pos = sum(not r.is_safe for r in rows)
    n_neg = len(rows) - n_pos
    return {"sensitivity": tp / n_pos if n_pos else float("nan"), "n_unsafe": n_pos,
            "specificity": tn / n_neg if n_neg else float("nan"), "n_safe": n_neg}


def save_rates(cfg: Config, kind: str, judge: Judge, rows: list[LabeledRow], verdicts: list[bool]) -> dict:
    rates = from_verdicts(verdicts, rows)
    atomic_write_text(rates_path(cfg, kind, judge, rows), json.dumps(rates))
    return rates


def judge_rates(cfg: Config, kind: str, judge: Judge, log=print) -> dict | None:
    """The judge's sensitivity and specificity on the held-out rows (cached; measured once), or None without a split."""
    rows = rate_rows(cfg)
    if not rows:
        return None
    path = rates_path(cfg, kind, judge, rows)
    if path.is_file():
        return json.loads(path.read_text())
    log(f"[eval] measuring the {kind} judge's error on {len(rows)} held-out labeled answers (once; cached)")
    threshold = getattr(judge, "threshold", 0.5)
    verdicts = [s > threshold for s in scores(judge, [r.prompt for r in rows], [r.response for r in rows])]
    return save_rates(cfg, kind, judge, rows, verdicts)
