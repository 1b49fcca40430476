"""`hftlab groups`: base -> alignment (reused) -> proxy runs -> matrix on Ray Data -> group file.

groups.method picks the rule: ForgotNum (generate and judge every row: the paper) or the loss-rise score (one forward
pass a row, no generation or judge).

The group file (groups.jsonl: id, forgot_num, score, group, ...) is what VAA's alignment reads.
The whole output directory is written atomically under a key of everything that decides the
groups (not the actor count or batch sizes, which only change the speed).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd

from hftlab.config.loader import digest
from hftlab.config.schema import Config
from hftlab.groups.matrix import build_matrix
from hftlab.groups.proxy import run_proxy
from hftlab.groups.vulnerability import aggregate, agreement, by_loss, forgot_num, overlap
from hftlab.run.inputs import plan
from hftlab.run.stages import base_model, complete_plan, train_stage
from hftlab.storage import atomic_dir, computed_once
from hftlab.tracking.logger import Tracker


def groups_key(cfg: Config, aligned: str, ids: list[str]) -> str:
    """Everything that decides the groups; with method=loss the judge and the answers' length do not."""
    g = cfg.groups
    what = ({"rule": g.rule, "at_least": g.at_least, "loss_score": g.loss_score, "judge": cfg.eval.judge,
             "max_new_tokens": cfg.eval.max_new_tokens} if g.method == "forgot_num" else
            {"method": g.method, "loss_share": g.loss_share})
    chosen = g.generation_backend  # vLLM's numerics are its own
    return digest({"aligned": aligned, "proxies": g.proxies, **what, "template": cfg.data.template, "ids": ids,
                   "seed": cfg.seed, **({"backend": chosen} if chosen != "hf" else {})})


def run_groups(cfg: Config, log=print) -> dict:
    """Estimate the vulnerability groups; returns a summary with the group file's path."""
    p = plan(cfg, proxies=True)  # every input checked before anything is trained
    with Tracker(cfg, run_name="groups") as tracker:
        base = base_model(cfg, log)
        p = complete_plan(cfg, p, base, tracker, log)
        aligned = train_stage(cfg, "align", base, p.align_pairs, tracker, log)
        out = Path(cfg.output_dir) / f"groups-{groups_key(cfg, aligned, [a.id for a in p.alignment])}"
        with computed_once(out, (out / "summary.json").is_file, log) as todo:  # racing runs: one estimates
            if todo:
                with atomic_dir(out) as tmp:  # the matrix's journal lives beside it: a rerun takes it up
                    _estimate(cfg, p, aligned, tmp, out.parent / f".matrix-{out.name}.jsonl", log)
            else:
                log(f"[groups] reusing {out}")
        summary = json.loads((out / "summary.json").read_text())
        tracker.metrics({f"groups.{k}": v for k, v in summary.items() if isinstance(v, int | float)})
        for name in ("groups.jsonl", "forgot_num_hist.png", "loss_score_hist.png", "category_vulnerability.png",
                     "overlap.md"):
            if (out / name).is_file():
                tracker.artifact(out / name, "groups")
        summary.update(path=str(out), group_file=str(out / "groups.jsonl"), run_id=tracker.run_id)
    log(f"[groups] {summary['n_vulnerable']} of {summary['n_examples']} alignment examples vulnerable "
        f"({100 * summary['vulnerable_share']:.1f}%); group file {out / 'groups.jsonl'}")
    return summary


def _estimate(cfg: Config, p, aligned: str, tmp: Path, journal: Path, log) -> None:
    runs = [run_proxy(cfg, proxy, aligned, p.proxy_tasks[proxy.task], p.harmful, log) for proxy in cfg.groups.proxies]
    start = time.time()
    matrix = build_matrix(cfg, p.alignment, runs, tmp / "matrix.parquet", journal=journal, log=log)  # one actor pool
    matrix_seconds = time.time() - start
    log(f"[groups] matrix {len(matrix)} rows ({len(runs)} proxies, {sum(map(len, runs))} checkpoints) "
        f"in {matrix_seconds:.1f}s")
    per_proxy = [forgot_num(matrix[matrix["proxy"] == k]) for k in range(len(runs))]
    by_forgetting = cfg.groups.method == "forgot_num"
    groups = (aggregate(per_proxy, cfg.groups.rule, cfg.groups.at_least) if by_forgetting else
              by_loss(per_proxy, cfg.groups.loss_share))
    categories = pd.Series({a.id: a.category for a in p.alignment})
    groups["category"] = categories.reindex(groups.index)
    groups = groups.reset_index().rename(columns={"index": "id"})
    (tmp / "groups.jsonl").write_text(groups.to_json(orient="records", lines=True))
    _plots(groups, tmp)
    if len(per_proxy) > 1 and by_forgetting:
        _overlap_table(cfg, per_proxy, tmp)
    summary = {"method": cfg.groups.method, "n_examples": len(groups), "n_vulnerable": int(groups["group"].sum()),
               "vulnerable_share": float(groups["group"].mean()), "matrix_seconds": matrix_seconds,
               **({"max_forgot_num": int(groups["forgot_num"].max()), **agreement(groups)} if by_forgetting else {})}
    (tmp / "summary.json").write_text(json.dumps(summary, indent=1))


def _plots(groups: pd.DataFrame, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    if "forgot_num" in groups:
        counts = groups["forgot_num"].value_counts().sort_index()
        ax.bar(counts.index.astype(str), counts.to_numpy())
        ax.set(xlabel="ForgotNum", ylabel="alignment examples", title="ForgotNum histogram")
        name = "forgot_num_hist.png"
    else:  # method=loss
        ax.hist(groups["score"].dropna(), bins=40)
        ax.axvline(groups.loc[groups["group"] == 1, "score"].min(), color="k", ls="--", label="vulnerable from here")
        ax.set(xlabel="loss rise over the proxy checkpoints", ylabel="alignment examples", title="Loss-rise score")
        ax.legend()
        name = "loss_score_hist.png"
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)

    rate = groups.groupby("category")["group"].mean().sort_values()
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(rate) + 1.2))
    ax.barh([c.split(",")[0] for c in rate.index], 100 * rate.to_numpy())
    ax.set(xlabel="% vulnerable", title="Vulnerability rate per category")
    fig.tight_layout()
    fig.savefig(out / "category_vulnerability.png", dpi=110)
    plt.close(fig)


def _overlap_table(cfg: Config, per_proxy: list[pd.DataFrame], out: Path) -> None:
    """Pairwise 'common forget' shares between proxy runs (the paper's Figure 2), as Markdown."""
    rows = ["| proxy a | proxy b | forgot a | forgot b | common | common / a | common / b | Jaccard |",
            "|---|---|---|---|---|---|---|---|"]
    names = [f"{px.task} p={px.poison_ratio} lr={px.lr:g}" for px in cfg.groups.proxies]
    for i in range(len(per_proxy)):
        for j in range(i + 1, len(per_proxy)):
            o = overlap(per_proxy[i], per_proxy[j])
            rows.append(f"| {names[i]} | {names[j]} | {o['forgot_a']} | {o['forgot_b']} | {o['common']} | "
                        f"{o['common_of_a']:.2f} | {o['common_of_b']:.2f} | {o['jaccard']:.2f} |")
    (out / "overlap.md").write_text("\n".join(rows) + "\n")
