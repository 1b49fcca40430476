"""Paper-style tables and plots from MLflow: `hftlab report EXPERIMENT`.

The papers report HS and FA after harmful fine-tuning as methods x tasks, methods x poison ratio p and
methods x fine-tuning epochs, mean ± std over seeds, best per column in bold. This module rebuilds
those layouts from the runs MLflow holds (read through tracking/client.py), so a table is always traceable
to the runs behind it:

- Runs: the children of one sweep's parent run (default: the experiment's latest sweep), or, in an
  experiment without sweeps, every top-level run; only FINISHED runs with `finetuned.hs`.
- Columns: one table per axis (`finetune.task`, `finetune.poison_ratio`, `finetune.epochs`, `finetune.lr`)
  that takes more than one value among the runs; the task table when none does.
- Rows: the run's `label` param or `align.method+finetune.method`, plus every other param that varies among
  the runs of that row (e.g. a VAA lambda), except the seeds (`seed`, `base.tiny.seed`): a cell averages over them.
- Dose response: for a numeric axis with several seeds, report/dose.py adds per-method areas under the
  HS curve, HS/FA curves (PNG) and pairwise tests across seeds. Std is the population std (numpy's
  default, as jobs/compare.py); a single seed shows ± 0.0.
- Best: the lowest mean HS and the highest mean FA of each column, bold (ties all bold).
- Paired differences (report/paired.py): each method against the baseline row on the same prompts and seeds, with
  a 95% bootstrap interval, and the power line.
Outputs (Markdown, CSV, PNG) go to `--out` and, as artifacts under `report/`, to the parent run.
"""

from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from hftlab.report.paired import paired_section
from hftlab.report.provenance import provenance
from hftlab.tracking import client as tracking

AXES = {"task": "finetune.task", "p": "finetune.poison_ratio", "epochs": "finetune.epochs", "lr": "finetune.lr"}
AVERAGED = ("seed", "base.tiny.seed")
"""What a cell averages over; a (seed, base seed) pair is one unit of the dose-response tests (report/dose.py)."""
BOOKKEEPING = ("output_dir", "cache_dir", "threads", "tracking.", "name", "label")


@dataclass
class Cell:
    hs: list[float]
    fa: list[float]

    @property
    def stats(self) -> tuple[float, float, float, float]:
        return (statistics.fmean(self.hs), statistics.pstdev(self.hs), statistics.fmean(self.fa), statistics.pstdev(self.fa))


@dataclass
class Table:
    axis: str
    """The short axis name: task, p or epochs."""
    rows: list[str]
    columns: list[str]
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)

    def best(self, column: str) -> tuple[set[str], set[str]]:
        """Rows with the lowest mean HS and with the highest mean FA in `column`."""
        means = {r: self.mean(r, column) for r in self.rows}
        means = {r: m for r, m in means.items() if m is not None}
        if not means:
            return set(), set()
        low = min(m[0] for m in means.values())
        high = max(m[1] for m in means.values())
        return {r for r, m in means.items() if m[0] == low}, {r for r, m in means.items() if m[1] == high}

    def mean(self, row: str, column: str) -> tuple[float, float] | None:
        """(HS, FA) means; the average column averages the row's cell means."""
        if column == "avg":
            got = [self.mean(row, c) for c in self.columns]
            if any(g is None for g in got):
                return None
            return statistics.fmean(g[0] for g in got), statistics.fmean(g[1] for g in got)
        cell = self.cells.get((row, column))
        return None if cell is None else cell.stats[0::2]

    @property
    def shown_columns(self) -> list[str]:
        return self.columns + (["avg"] if len(self.columns) > 1 else [])


def select_runs(uri: str, experiment: str, parent: str | None = None) -> tuple[list[dict], str | None]:
    """The runs a report covers, and the parent run (None in an experiment without sweeps)."""
    if parent is None:
        sweeps = tracking.search_runs(uri, experiment, "tags.`hftlab.role` = 'sweep'")
        parent = sweeps[-1]["run_id"] if sweeps else None
    runs = (tracking.children(uri, experiment, parent) if parent else
            [r for r in tracking.search_runs(uri, experiment) if "mlflow.parentRunId" not in r["tags"]])
    return [r for r in runs if r["status"] == "FINISHED" and "finetuned.hs" in r["metrics"]], parent


def _order(values: set[str]) -> list[str]:
    try:
        return sorted(values, key=float)
    except ValueError:
        return sorted(values)


def row_names(runs: list[dict], key: str) -> list[str]:
    """Each run's row: its `label` param if set, else align.method+finetune.method; then every other param that
    varies among the runs sharing that name (e.g. a VAA lambda), except `key` and what a cell averages over."""
    def base(r: dict) -> str:
        p = r["params"]
        return p.get("label") or f"{p.get('align.method')}+{p.get('finetune.method')}"

    names = [base(r) for r in runs]
    varying: dict[str, list[str]] = {}
    for name in set(names):
        mine = [r for r, n in zip(runs, names, strict=True) if n == name]
        params = {k for r in mine for k in r["params"]}
        varying[name] = sorted(k for k in params if len({r["params"].get(k) for r in mine}) > 1 and k != key
                               and k not in AVERAGED and not k.startswith(BOOKKEEPING))
    return [" ".join([n] + [f"{k.rsplit('.', 1)[-1]}={r['params'].get(k)}" for k in varying[n]])
            for r, n in zip(runs, names, strict=True)]


def build_table(runs: list[dict], axis: str) -> Table:
    """One layout: rows are methods (+ other varying params), columns the values of `axis`."""
    key = AXES[axis]
    table = Table(axis, [], [])
    for r, row in zip(runs, row_names(runs, key), strict=True):
        p = r["params"]
        cell = table.cells.setdefault((row, p.get(key)), Cell([], []))
        cell.hs.append(r["metrics"]["finetuned.hs"])
        cell.fa.append(r["metrics"].get("finetuned.fa", float("nan")))
    table.rows = sorted({r for r, _ in table.cells})
    table.columns = _order({c for _, c in table.cells})
    return table


def to_markdown(table: Table) -> str:
    head = [f"{'Avg' if c == 'avg' else f'{table.axis}={c}'} {m}" for c in table.shown_columns for m in ("HS", "FA")]
    lines = [f"HS and FA (%) after harmful fine-tuning, methods x {table.axis} ({AXES[table.axis]}); "
             "mean ± std over seeds; best per column in bold (lowest HS, highest FA).", "",
             "| method | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    best = {c: table.best(c) for c in table.shown_columns}
    for row in table.rows:
        out = [row]
        for c in table.shown_columns:
            if c == "avg":
                m = table.mean(row, c)
                texts = ["-", "-"] if m is None else [f"{m[0]:.1f}", f"{m[1]:.1f}"]
            elif (row, c) not in table.cells:
                texts = ["-", "-"]
            else:
                hs, hs_sd, fa, fa_sd = table.cells[(row, c)].stats
                texts = [f"{hs:.1f} ± {hs_sd:.1f}", f"{fa:.1f} ± {fa_sd:.1f}"]
            out += [f"**{t}**" if row in winners and t != "-" else t for t, winners in zip(texts, best[c], strict=True)]
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def write_csv(table: Table, path: Path) -> None:
    """Tidy CSV: one line per (method, column) with full-precision means, stds, n and the best marks."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "axis", "column", "hs_mean", "hs_std", "fa_mean", "fa_std", "n", "hs_best", "fa_best"])
        for c in table.columns:
            low, high = table.best(c)
            for row in table.rows:
                if (row, c) in table.cells:
                    cell = table.cells[(row, c)]
                    w.writerow([row, AXES[table.axis], c, *cell.stats, len(cell.hs), int(row in low), int(row in high)])


def plot(table: Table, path: Path) -> None:
    """HS vs the axis value, one line per method, std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for row in table.rows:
        xs = [c for c in table.columns if (row, c) in table.cells]
        stats = [table.cells[(row, c)].stats for c in xs]
        ax.errorbar([float(x) for x in xs], [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3, label=row)
    ax.set(xlabel=AXES[table.axis], ylabel="HS after fine-tuning (%)", title=f"HS vs {table.axis}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(uri: str, experiment: str, out: str | Path, parent: str | None = None, log=print) -> dict:
    """Write every layout the runs support to `out` and log them to the parent run (or a new report run)."""
    runs, parent = select_runs(uri, experiment, parent)
    if parent and tracking.get_run(uri, parent)["tags"].get("hftlab.nested") == "true":  # an attack sweep's report
        from hftlab.report.attack import write_attack_report

        return write_attack_report(uri, experiment, out, parent, log)
    if not runs:
        raise ValueError(f"experiment {experiment!r} at {uri} has no finished runs with finetuned.hs")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    axes = [a for a, key in AXES.items() if len({r["params"].get(key) for r in runs}) > 1] or ["task"]
    tables, files = {}, []
    sections = [f"# Report: experiment {experiment}", "",
                f"{len(runs)} finished runs" + (f", children of sweep run {parent}" if parent else "") + ".", "",
                provenance(uri, parent, runs), ""]
    for axis in axes:
        table = tables[axis] = build_table(runs, axis)
        md = to_markdown(table)
        (out / f"table-{axis}.md").write_text(md)
        write_csv(table, out / f"table-{axis}.csv")
        files += [out / f"table-{axis}.md", out / f"table-{axis}.csv"]
        sections += [f"## methods x {axis}", "", md]
        paired = paired_section(uri, runs, AXES[axis], row_names(runs, AXES[axis]))
        if paired:
            (out / f"paired-{axis}.md").write_text(paired)
            files.append(out / f"paired-{axis}.md")
            sections += [f"## paired differences over {axis}", "", paired]
        if axis != "task":
            plot(table, out / f"hs-vs-{axis}.png")
            files.append(out / f"hs-vs-{axis}.png")
            if len({(r["params"].get("seed"), r["params"].get("base.tiny.seed")) for r in runs}) > 1:
                from hftlab.report.dose import dose_section

                md, pngs = dose_section(runs, axis, AXES[axis], row_names(runs, AXES[axis]), out)
                (out / f"dose-{axis}.md").write_text(md)
                files += [out / f"dose-{axis}.md", *pngs]
                sections += [f"## dose response over {axis}", "", md, f"![HS and FA vs {axis}](dose-{axis}.png)", ""]
    units = {(r["params"].get("seed"), r["params"].get("base.tiny.seed")) for r in runs}
    single = len({r["params"].get("finetune.task") for r in runs}) == 1 and all(AXES["lr"] in r["params"] for r in runs)
    if axes == ["task"] and single and len(units) > 1:
        from hftlab.report.dose import dose_section  # one setting, several seeds: the same per-method stats and tests

        md, pngs = dose_section(runs, "lr", AXES["lr"], row_names(runs, AXES["lr"]), out)
        (out / "seeds.md").write_text(md)
        files += [out / "seeds.md", *pngs]
        sections += ["## methods over seeds, with tests", "", md]
    (out / "report.md").write_text("\n".join(sections))
    files.insert(0, out / "report.md")
    target = parent or tracking.start_parent(uri, experiment, "report", tags={"hftlab.role": "report"}, params={})
    tracking.log_artifacts(uri, target, out, "report")
    if not parent:
        tracking.set_status(uri, target, "FINISHED")
    log(f"report: {len(runs)} runs -> {', '.join(str(f) for f in files)} (logged to run {target})")
    return {"files": [str(f) for f in files], "tables": tables, "parent": parent, "run_id": target, "runs": runs}
