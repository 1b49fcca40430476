"""The dose-response part of `hftlab report`: HS and FA curves over a fine-tuning strength axis, one area per
method and seed, and which differences between methods hold across seeds (statistics in report/dose_stats.py).

A seed unit is one (seed, base.tiny.seed) pair: the same unit of two methods shares the base model, the data
order and the fine-tuning mix, so the bootstrap pairs them. A unit enters a method's area only if it ran every
strength value of that method's curve.
"""

from __future__ import annotations

import statistics
from itertools import combinations
from pathlib import Path

from hftlab.report.dose_stats import LOG_AXES, auc, compare


def _unit(run: dict) -> str:
    p = run["params"]
    return f"{p.get('seed', '0')}/{p.get('base.tiny.seed', 'None')}"


def _ms(values: list[float]) -> str:
    return f"{statistics.fmean(values):.1f} ± {statistics.pstdev(values):.1f}" if values else "-"


def collect(runs: list[dict], key: str, names: list[str]) -> dict[str, dict[str, dict[float, dict]]]:
    """{row: {unit: {strength: run metrics}}}."""
    data: dict[str, dict[str, dict[float, dict]]] = {}
    for run, row in zip(runs, names, strict=True):
        data.setdefault(row, {}).setdefault(_unit(run), {})[float(run["params"][key])] = run["metrics"]
    return data


def areas(curves: dict[str, dict[float, dict]], metric: str, log: bool) -> dict[str, float]:
    """Per-unit area under metric(strength), for the units that ran every strength the row has."""
    xs = sorted({x for c in curves.values() for x in c})
    return {u: auc(xs, [c[x][metric] for x in xs], log=log) for u, c in curves.items() if all(x in c for x in xs)}


def dose_section(runs: list[dict], axis: str, key: str, names: list[str], out: Path) -> tuple[str, list[Path]]:
    """Markdown (areas, curves table, pairwise tests) and a PNG of HS and FA vs `key`; returns (markdown, files)."""
    log = key in LOG_AXES
    data = collect(runs, key, names)
    rows = sorted(data)
    hs_area = {r: areas(data[r], "finetuned.hs", log) for r in rows}
    fa_area = {r: areas(data[r], "finetuned.fa", log) for r in rows}
    xs = sorted({x for r in rows for c in data[r].values() for x in c})
    what = (f"HS-vs-{axis} areas: the mean HS (%) over {key} from {xs[0]:g} to {xs[-1]:g}{' on a log axis' if log else ''}"
            if len(xs) > 1 else f"HS (%) at {key}={xs[0]:g} (the area of a one-point curve)")
    lines = [f"{what}, per seed unit (seed/base seed), then mean ± std over units.", "",
             "| method | units | HS area | FA area | " + " | ".join(f"HS @{x:g}" for x in xs)
             + " | aligned HS | q vulnerable (end) |", "|---|" + "---|" * (len(xs) + 5)]
    for r in sorted(rows, key=lambda r: statistics.fmean(hs_area[r].values()) if hs_area[r] else 1e9):
        at = [_ms([c[x]["finetuned.hs"] for c in data[r].values() if x in c]) for x in xs]
        aligned = [c[x]["aligned.hs"] for c in data[r].values() for x in c if "aligned.hs" in c[x]]
        q = [c[x]["align.final_q_1"] for c in data[r].values() for x in c if "align.final_q_1" in c[x]]
        lines.append(f"| {r} | {len(hs_area[r])} | {_ms(list(hs_area[r].values()))} | {_ms(list(fa_area[r].values()))} | "
                     + " | ".join(at) + f" | {_ms(aligned)} | {_ms(q)} |")
    lines += ["", "Pairwise, on the per-unit HS areas: difference of means (row minus column method), Welch's t-test, "
              "and a 95% paired bootstrap interval over the shared units. **holds** = p < 0.05 and the interval "
              "excludes 0.", "", "| a | b | HS area a - b | Welch p | bootstrap 95% | paired units | holds |",
              "|---|---|---|---|---|---|---|"]
    for a, b in combinations(rows, 2):
        if len(hs_area[a]) < 2 or len(hs_area[b]) < 2:
            continue
        c = compare(a, hs_area[a], b, hs_area[b])
        lines.append(f"| {a} | {b} | {c.mean_diff:+.1f} | {c.welch_p:.3f} | [{c.ci_low:+.1f}, {c.ci_high:+.1f}] | "
                     f"{c.n_paired} | {'**holds**' if c.holds else 'no'} |")
    png = out / f"dose-{axis}.png"
    plot_curves(data, rows, xs, key, log, png)
    return "\n".join(lines) + "\n", [png]


def plot_curves(data: dict, rows: list[str], xs: list[float], key: str, log: bool, path: Path) -> None:
    """HS and FA vs strength, one line per method, mean ± std over units as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, label in zip(axes, ("finetuned.hs", "finetuned.fa"), ("HS after fine-tuning (%)", "FA (%)"), strict=True):
        for r in rows:
            pts = [(x, [c[x][metric] for c in data[r].values() if x in c]) for x in xs]
            pts = [(x, v) for x, v in pts if v]
            mean = [statistics.fmean(v) for _, v in pts]
            sd = [statistics.pstdev(v) for _, v in pts]
            line = ax.plot([x for x, _ in pts], mean, marker="o", label=r)[0]
            ax.fill_between([x for x, _ in pts], [m - s for m, s in zip(mean, sd, strict=True)],
                            [m + s for m, s in zip(mean, sd, strict=True)], color=line.get_color(), alpha=0.15)
        ax.set(xlabel=key, ylabel=label, xscale="log" if log else "linear")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
