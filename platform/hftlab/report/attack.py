"""The report of a nested attack sweep (sweep/attacks.py): does a defense hold once the attacker tunes?

Per defense (its settings without the seed; a row averages its seeds): the worst guarded HS (mean over seeds, each
seed's with the Wilson interval of its worst attack's prompts), the attack that reached it, how many attacks passed the
guard, and the HS of the base config's own attack beside it. The best-so-far curve (PNG) shows the worst guarded HS an
attacker has found after 1, 2, ... attacks, averaged over seeds: how much search it takes. A maximum over many attacks
is biased upwards (each HS is itself noisy), so a small gap between the fixed and the worst HS is not yet a finding.
"""

from __future__ import annotations

import csv
import math
import re
import statistics
from collections import Counter
from pathlib import Path

from hftlab.sweep.attacks import best_so_far, finished_attacks
from hftlab.tracking import client as tracking

SEEDS = ("seed", "base.tiny.seed")


def defense_name(run: dict) -> str:
    """The defense's run name without its seed."""
    return " ".join(w for w in run["run_name"].split() if not w.startswith(tuple(f"{s}=" for s in ("seed", "tiny.seed"))))


def short(name: str) -> str:
    """An attack's run name with its drawn numbers to 3 significant digits (lr=5.6120957595237356e-05 -> lr=5.61e-05)."""
    return re.sub(r"\d+\.\d{4,}(?:e-?\d+)?", lambda m: f"{float(m.group()):.3g}", name)


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.fmean(values) if values else float("nan")


def collect(uri: str, experiment: str, parent: str) -> dict[str, list[dict]]:
    """Per defense name, one entry per finished defense run: its metrics, worst attack and best-so-far curve."""
    rows: dict[str, list[dict]] = {}
    for run in tracking.children(uri, experiment, parent):
        if run["tags"].get("hftlab.role") != "defense" or run["status"] != "FINISHED":
            continue
        m = run["metrics"]
        attacks = finished_attacks(tracking.children(uri, experiment, run["run_id"]))
        rows.setdefault(defense_name(run), []).append({
            "seed": run["params"].get("seed", "0"), "metrics": m, "worst": run["tags"].get("hftlab.worst_attack", "none"),
            "curve": best_so_far(attacks, m.get("guard.threshold", 0.0)), "attacks": len(attacks)})
    return rows


def table(rows: dict[str, list[dict]]) -> list[dict]:
    out = []
    for name, seeds in rows.items():
        nan = float("nan")
        per_seed = [(s["metrics"].get("worst.hs", nan), s["metrics"].get("worst.hs_lo", nan),
                     s["metrics"].get("worst.hs_hi", nan)) for s in sorted(seeds, key=lambda s: s["seed"])]
        out.append({"defense": name, "seeds": len(seeds), "worst_hs": _mean([p[0] for p in per_seed]),
                    "per_seed": per_seed, "fixed_hs": _mean([s["metrics"]["fixed.hs"] for s in seeds]),
                    "worst_fa": _mean([s["metrics"].get("worst.fa", nan) for s in seeds]),
                    "fixed_fa": _mean([s["metrics"]["fixed.fa"] for s in seeds]),
                    "guarded": sum(int(s["metrics"].get("attack.guarded", 0)) for s in seeds),
                    "attacks": sum(s["attacks"] for s in seeds),
                    "attack": short(Counter(s["worst"] for s in seeds).most_common(1)[0][0])})
    return sorted(out, key=lambda r: (math.isnan(r["worst_hs"]), r["worst_hs"]))


def to_markdown(rows: list[dict]) -> str:
    def f(x: float) -> str:
        return "n/a" if math.isnan(x) else f"{x:.1f}"

    lines = ["| defense | seeds | worst guarded HS | per seed [95% Wilson] | attack reaching it (most seeds) | "
             "fixed-setting HS | FA worst / fixed | attacks passing the guard |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        seeds = "; ".join(f"{f(hs)} [{f(lo)}, {f(hi)}]" for hs, lo, hi in r["per_seed"])
        lines.append(f"| {r['defense']} | {r['seeds']} | **{f(r['worst_hs'])}** | {seeds} | {r['attack']} | "
                     f"{f(r['fixed_hs'])} | {f(r['worst_fa'])} / {f(r['fixed_fa'])} | {r['guarded']} / {r['attacks']} |")
    return "\n".join(lines) + "\n"


def plot_curves(rows: dict[str, list[dict]], path: Path) -> None:
    """Best-so-far worst guarded HS over the attacks tried, one line per defense (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.8, 3.8))
    for name, seeds in rows.items():
        n = max(len(s["curve"]) for s in seeds)
        ys = [_mean([s["curve"][i] for s in seeds if i < len(s["curve"])]) for i in range(n)]
        ax.plot(range(1, n + 1), ys, marker="o", markersize=3, label=name)
    ax.set(xlabel="attacks tried", ylabel="worst guarded HS so far (%)", ylim=(-3, 103),
           title="How much search an attacker needs")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_attack_report(uri: str, experiment: str, out: str | Path, parent: str, log=print) -> dict:
    """Write report.md, worst-case.csv and best-so-far.png to `out` and log them to the sweep's run."""
    from hftlab.report.provenance import provenance

    rows = collect(uri, experiment, parent)
    if not rows:
        raise ValueError(f"sweep run {parent} in experiment {experiment!r} has no finished defenses")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    worst = table(rows)
    md = to_markdown(worst)
    with open(out / "worst-case.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["defense", "seeds", "worst_hs", "fixed_hs", "worst_fa", "fixed_fa", "guarded", "attacks", "attack"])
        for r in worst:
            w.writerow([r[k] for k in ("defense", "seeds", "worst_hs", "fixed_hs", "worst_fa", "fixed_fa", "guarded",
                                       "attacks", "attack")])
    plot_curves(rows, out / "best-so-far.png")
    sweep = tracking.get_run(uri, parent)
    runs = [s for seeds in rows.values() for s in seeds]
    text = [f"# Worst-case HS under a tuning attacker: experiment {experiment}", "",
            f"{len(runs)} defense runs, children of sweep run {parent}.", "",
            provenance(uri, parent, tracking.children(uri, experiment, parent)), "",
            f"Guard: an attack counts when its fine-tuned FA is at least the run's threshold (guard.threshold; "
            f"sweep {sweep['run_name']}). Lower worst-case HS is better.", "", md,
            "![best-so-far worst guarded HS over attacks tried](best-so-far.png)", ""]
    (out / "report.md").write_text("\n".join(text))
    tracking.log_artifacts(uri, parent, out, "report")
    files = [str(out / n) for n in ("report.md", "worst-case.csv", "best-so-far.png")]
    log(f"report: {len(runs)} defense runs -> {', '.join(files)} (logged to run {parent})")
    return {"files": files, "table": worst, "parent": parent, "run_id": parent, "runs": runs}
