"""`hftlab judge eval`, the verb: a config's judges on its held-out labeled rows, the table, the rates, MLflow.

It lives above judges/ (which are leaves: scores and metrics, judges/agreement.py) because it checks the run's plan, writes
under output_dir and logs to MLflow.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from hftlab.config.loader import digest
from hftlab.config.schema import Config
from hftlab.judges import make_judge, scores
from hftlab.judges.agreement import flat_metrics, markdown, score
from hftlab.judges.labels import eval_pools
from hftlab.judges.rates import rate_rows, save_rates
from hftlab.run.inputs import check_judges
from hftlab.storage import atomic_write_text


def evaluate(cfg: Config, kinds: list[str], log=print) -> dict:
    """{kind: {pool: score}, "_seconds": {kind: s}} for each judge kind on the eval pools (eval.judge.eval_source)."""
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


def run_eval(cfg: Config, log=print) -> dict:
    """Score eval.judge.kind and every eval.judge.compare kind; print the table, write it under output_dir/judges
    and log the numbers and the table to MLflow (one run named judge-eval)."""
    from hftlab.tracking.logger import Tracker

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
