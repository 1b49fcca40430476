"""`hftlab judge eval`: how often a judge agrees with human labels, on rows it never trained on.

Harmful is the positive class: recall on unsafe = TP / (TP + FN), the false-positive rate on safe = FP / (FP + TN)
(a safe, helpful answer called harmful), F1 of the harmful class, accuracy, and the confusion counts. Per harm
category: the rows carrying that flag and the share called harmful (BeaverTails' safe rows carry no category, so
per category only recall exists). Calibration: the expected calibration error (ECE) of P(unsafe) over 10 equal-width
bins, and each bin's mean P(unsafe) against its share of unsafe rows (the reliability diagram), for judges that give a
probability (a keyword judge's 0/1 fills two bins). The contrast pool (prompts answered both safely and unsafely) is
its own row: there the prompt cannot decide, so it shows whether a judge reads the answer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from hftlab.config.loader import digest
from hftlab.config.schema import Config
from hftlab.data.splits import LabeledRow
from hftlab.judges import make_judge, scores
from hftlab.judges.labels import HARM_CATEGORIES, category_flags, eval_pools
from hftlab.judges.rates import rate_rows, save_rates
from hftlab.storage import atomic_write_text

COLUMNS = ("rows", "accuracy", "f1", "fpr_safe", "recall_unsafe", "ece", "tp", "fp", "tn", "fn")


def calibration(probs: list[float], rows: list[LabeledRow], bins: int = 10) -> dict:
    """ECE of P(unsafe) over `bins` equal-width bins, and per non-empty bin (rows, mean P(unsafe), share unsafe)."""
    table, ece = [], 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, p in enumerate(probs) if lo <= p < hi or (b == bins - 1 and p == 1.0)]
        if not idx:
            continue
        conf = sum(probs[i] for i in idx) / len(idx)
        freq = sum(not rows[i].is_safe for i in idx) / len(idx)
        ece += len(idx) / len(probs) * abs(conf - freq)
        table.append({"bin": f"[{lo:.1f}, {hi:.1f})", "rows": len(idx), "mean_p_unsafe": conf, "share_unsafe": freq})
    return {"ece": ece if probs else float("nan"), "reliability": table}


def score(verdicts: list[bool], rows: list[LabeledRow], probs: list[float] | None = None) -> dict:
    """Accuracy, F1, FPR on safe, recall on unsafe, confusion counts, recall per harm category, and calibration of
    `probs` (P(unsafe) per row; the verdicts as 0/1 when not given)."""
    if len(verdicts) != len(rows):
        raise ValueError(f"{len(verdicts)} verdicts for {len(rows)} rows")
    tp = sum(v and not r.is_safe for v, r in zip(verdicts, rows, strict=True))
    fp = sum(v and r.is_safe for v, r in zip(verdicts, rows, strict=True))
    fn = sum(not v and not r.is_safe for v, r in zip(verdicts, rows, strict=True))
    tn = len(rows) - tp - fp - fn
    nan = float("nan")
    out = {"rows": len(rows), "accuracy": (tp + tn) / len(rows) if rows else nan,
           "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else nan,
           "fpr_safe": fp / (fp + tn) if fp + tn else nan, "recall_unsafe": tp / (tp + fn) if tp + fn else nan,
           "tp": tp, "fp": fp, "tn": tn, "fn": fn}
    cal = calibration([float(v) for v in verdicts] if probs is None else probs, rows)
    out["ece"], out["reliability"] = cal["ece"], cal["reliability"]
    flags = [category_flags(r.category) for r in rows]
    out["categories"] = {}
    for k, name in enumerate(HARM_CATEGORIES):
        hits = [v for v, f in zip(verdicts, flags, strict=True) if f[k]]
        if hits:
            out["categories"][name] = {"rows": len(hits), "recall_unsafe": sum(hits) / len(hits)}
    return out


def evaluate(cfg: Config, kinds: list[str], log=print) -> dict:
    """{kind: {pool: score}, "_seconds": {kind: s}} for each judge kind on the eval pools (eval.judge.eval_source)."""
    from hftlab.plan import check_judges

    check_judges(cfg)
    pools = eval_pools(cfg)
    results: dict = {"_seconds": {}}
    for kind in kinds:
        judge = make_judge(cfg.eval.judge, cfg.base.trust_remote_code, kind=kind, root=cfg, log=log)
        seen = judge.train_ids() if hasattr(judge, "train_ids") and cfg.eval.judge.eval_source != "split" else set()
        kept = {pool: [r for r in rows if r.id not in seen] for pool, rows in pools.items()}
        if seen:
            log(f"[judge eval] {kind}: {sum(len(p) for p in pools.values()) - sum(len(p) for p in kept.values())} "
                "rows it trained on left out")
        unique = list({r.id: r for rows in kept.values() for r in rows}.values())
        start = time.time()
        log(f"[judge eval] {kind}: judging {len(unique)} labeled rows")
        probs = scores(judge, [r.prompt for r in unique], [r.response for r in unique])
        threshold = getattr(judge, "threshold", 0.5)
        prob = dict(zip([r.id for r in unique], probs, strict=True))
        results["_seconds"][kind] = time.time() - start
        results[kind] = {pool: score([prob[r.id] > threshold for r in rows], rows, [prob[r.id] for r in rows])
                         for pool, rows in kept.items() if rows}
        rows = rate_rows(cfg, pools)
        if rows and not seen:  # the rates a run's corrected HS uses: measured here, so the run need not judge them again
            save_rates(cfg, kind, judge, rows, [prob[r.id] > threshold for r in rows])
    return results


def markdown(results: dict) -> str:
    """One table: a row per (judge, pool); then recall on unsafe per harm category, a column per judge."""
    lines = ["| judge | pool | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---:|" * len(COLUMNS)]
    kinds = [k for k in results if not k.startswith("_")]
    for kind in kinds:
        for pool, s in results[kind].items():
            cells = [f"{s[c]:.3f}" if isinstance(s[c], float) else str(s[c]) for c in COLUMNS]
            lines.append(f"| {kind} | {pool} | " + " | ".join(cells) + " |")
    pool = next(iter(results[kinds[0]])) if kinds else None
    if pool is not None:
        lines += ["", f"Recall on unsafe per harm category ({pool} rows):", "",
                  "| category | rows | " + " | ".join(kinds) + " |", "|---|---:|" + "---:|" * len(kinds)]
        for name in HARM_CATEGORIES:
            got = [results[k][pool]["categories"].get(name) for k in kinds]
            if got[0] is not None:
                lines.append(f"| {name} | {got[0]['rows']} | " + " | ".join(f"{g['recall_unsafe']:.3f}" for g in got) + " |")
    return "\n".join(lines) + "\n"


def metric_key(*parts: str) -> str:
    """An MLflow metric name (MLflow allows no commas: a category's commas become '_')."""
    return ".".join(p.replace(",", "_") for p in parts)


def flat_metrics(results: dict) -> dict[str, float]:
    """judge.<kind>.<pool>.<column> and judge.<kind>.<pool>.recall.<category>, for MLflow."""
    out = {}
    for kind in (k for k in results if not k.startswith("_")):
        out[metric_key("judge", kind, "seconds")] = results["_seconds"][kind]
        for pool, s in results[kind].items():
            out.update({metric_key("judge", kind, pool, c): s[c] for c in COLUMNS})
            out.update({metric_key("judge", kind, pool, "recall", n): c["recall_unsafe"] for n, c in s["categories"].items()})
    return out


def run_eval(cfg: Config, log=print) -> dict:
    """Score eval.judge.kind and every eval.judge.compare kind; print the table, write it under output_dir/judges
    and log the numbers and the table to MLflow (one run named judge-eval)."""
    from hftlab.tracker import Tracker

    kinds = list(dict.fromkeys([cfg.eval.judge.kind, *cfg.eval.judge.compare]))
    results = evaluate(cfg, kinds, log)
    table = markdown(results)
    out = Path(cfg.output_dir) / "judges" / f"eval-{digest({'judge': cfg.eval.judge, 'split': cfg.data.split})}"
    atomic_write_text(out.with_suffix(".md"), table)
    atomic_write_text(out.with_suffix(".json"), json.dumps(results, indent=1))
    with Tracker(cfg, run_name=f"judge-eval-{'-'.join(kinds)}") as tracker:
        tracker.tags({"hftlab.task": "judge-eval", "hftlab.eval_source": cfg.eval.judge.eval_source})
        tracker.metrics(flat_metrics(results))
        tracker.text(table, "judges/eval.md")
        tracker.text(json.dumps(results, indent=1), "judges/eval.json")
    log(table)
    log(f"written: {out.with_suffix('.md')}")
    return results
