"""Judges side by side on a run's generated answers (eval.judge.compare): how often they agree, and where they do not.

For each stage (base, aligned, fine-tuned) every judge of the panel judges the same cached answers. The run gets,
as MLflow metrics, HS by each judge (`<stage>.hs_<kind>`), and as artifacts the agreement matrix (share of answers
with the same verdict, and Cohen's kappa) per stage and over all stages, and the answers they disagree on most (by
the spread of the judges' harmfulness scores: a probability where a judge has one, else its verdict as 0/1).
"""

from __future__ import annotations

from hftlab.config.schema import Config
from hftlab.judges import Judge, make_judge, scores
from hftlab.metrics import harmful_score, is_degenerate


def verdicts_and_scores(judge: Judge, prompts: list[str], answers: list[str]) -> tuple[list[bool], list[float]]:
    """One pass: the judge's scores, and its verdicts from them (score > its threshold; 0/1 scores: the verdict)."""
    s = scores(judge, prompts, answers)
    return [x > getattr(judge, "threshold", 0.5) for x in s], s


def kappa(a: list[bool], b: list[bool]) -> float:
    """Cohen's kappa of two verdict lists (1: perfect agreement, 0: what chance gives); nan when undefined."""
    n = len(a)
    if n == 0:
        return float("nan")
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    pa, pb = sum(a) / n, sum(b) / n
    expected = pa * pb + (1 - pa) * (1 - pb)
    return (observed - expected) / (1 - expected) if expected < 1 else float("nan")


def agreement_table(verdicts: dict[str, list[bool]]) -> str:
    """Markdown matrix: agreement share (kappa) for every pair of judges."""
    kinds = list(verdicts)
    lines = ["| | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
    for a in kinds:
        cells = []
        for b in kinds:
            va, vb = verdicts[a], verdicts[b]
            share = sum(x == y for x, y in zip(va, vb, strict=True)) / len(va) if va else float("nan")
            cells.append(f"{share:.3f} ({kappa(va, vb):.2f})")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


class JudgePanel:
    """The judges of eval.judge.compare over a run's stages; `add` per stage, `write` once at the end."""

    def __init__(self, cfg: Config, log=print, made: dict[str, Judge] | None = None) -> None:
        self.cfg, self.log = cfg, log
        self.kinds = list(dict.fromkeys(cfg.eval.judge.compare))
        self.judges: dict[str, Judge] = dict(made or {})  # the run's own judge is reused, not loaded twice
        self.rows: list[dict] = []  # one per (stage, answer): prompt, answer, verdict and score per judge

    def judge(self, kind: str) -> Judge:
        if kind not in self.judges:
            self.judges[kind] = make_judge(self.cfg.eval.judge, self.cfg.base.trust_remote_code, kind=kind,
                                           root=self.cfg, log=self.log)
        return self.judges[kind]

    def add(self, stage: str, prompts: list[str], answers: list[str]) -> dict[str, float]:
        """Judge one stage's answers with every judge; returns {hs_<kind>: HS %} (degenerate answers not harmful)."""
        rows = [{"stage": stage, "prompt": p, "answer": a} for p, a in zip(prompts, answers, strict=True)]
        degenerate = [is_degenerate(a) for a in answers]
        out = {}
        for kind in self.kinds:
            v, s = verdicts_and_scores(self.judge(kind), prompts, answers)
            for row, vi, si in zip(rows, v, s, strict=True):
                row[f"harmful_{kind}"], row[f"score_{kind}"] = bool(vi), float(si)
            out[f"hs_{kind}"] = harmful_score([x and not d for x, d in zip(v, degenerate, strict=True)])
        self.rows += rows
        return out

    def verdicts(self, stage: str | None = None) -> dict[str, list[bool]]:
        rows = [r for r in self.rows if stage is None or r["stage"] == stage]
        return {k: [r[f"harmful_{k}"] for r in rows] for k in self.kinds}

    def disagreements(self, n: int) -> list[dict]:
        """The n answers whose judges' verdicts differ, largest spread of scores first."""
        def spread(r: dict) -> float:
            s = [r[f"score_{k}"] for k in self.kinds]
            return max(s) - min(s)

        split = [r for r in self.rows if len({r[f"harmful_{k}"] for k in self.kinds}) > 1]
        return sorted(split, key=spread, reverse=True)[:n]

    def report(self) -> str:
        """Markdown: the agreement matrix per stage and over all stages, each judge's HS per stage."""
        stages = list(dict.fromkeys(r["stage"] for r in self.rows))
        parts = ["# Judges side by side on the generated answers", "",
                 "Agreement share of verdicts (Cohen's kappa in brackets).", ""]
        for stage in [*stages, None]:
            v = self.verdicts(stage)
            n = len(next(iter(v.values()))) if v else 0
            hs = ", ".join(f"{k} {100 * sum(x) / max(1, n):.1f}" for k, x in v.items())
            parts += [f"## {stage or 'all stages'} ({n} answers)", "", agreement_table(v), "",
                      f"Harmful verdicts by judge (%): {hs}", ""]
        return "\n".join(parts)

    def write(self, tracker, n: int = 40) -> None:
        """The report and the top-n disagreements as the run's artifacts (judges/agreement.md, judges/disagreements.json)."""
        if not self.rows or len(self.kinds) < 2:
            return
        tracker.text(self.report(), "judges/agreement.md")
        top = self.disagreements(n)
        if top:
            tracker.table({key: [r[key] for r in top] for key in top[0]}, "judges/disagreements.json")
