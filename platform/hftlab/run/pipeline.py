"""The main pipeline: base -> alignment -> harmful fine-tuning -> evaluation of all three.

Reads top to bottom. `plan()` loads and checks every input first, so a bad config or a bad
data file fails before any model is built. Each stage writes its output atomically under a key
hashed from everything that made it, so a rerun reuses finished stages and a crash loses nothing.
"""

from __future__ import annotations

import json
import time
from contextlib import closing
from dataclasses import asdict, replace
from pathlib import Path

import torch
import yaml

from hftlab.config.loader import ConfigError, to_dict
from hftlab.config.schema import Config
from hftlab.data.records import metric_name
from hftlab.judges import make_judge
from hftlab.judges.compare import JudgePanel
from hftlab.judges.rates import judge_rates
from hftlab.metrics import STAGES
from hftlab.resources import check_writable, peak_rss_gb
from hftlab.run.evaluation import Evaluation, Generators, answers, evaluate
from hftlab.run.inputs import Plan, plan, side_pairs
from hftlab.run.stages import base_model, check_gpus_of, complete_plan, train_stage
from hftlab.tracking.client import ui_hint
from hftlab.tracking.logger import Tracker
from hftlab.training.builtin_methods import groups_parent
from hftlab.training.methods import method_of

__all__ = ["STAGES", "base_model", "format_summary", "plan", "run", "train_stage", "vaa_groups"]



def read_groups(path: str, field: str = "align.vaa.group_file") -> dict[str, int]:
    """A group file's {id: group} (groups.jsonl: one {"id", "group", ...} object a line, group 0 or 1); any fault
    is a ConfigError naming `field`, the file and the line."""
    from hftlab.data.sources import read_rows

    if not path.endswith(".jsonl"):
        raise ConfigError(field, path, "a group file is a .jsonl file (groups.jsonl, written by hftlab groups)")
    out = {}
    for n, row in enumerate(read_rows(path, field), start=1):
        rid, g = row.get("id"), row.get("group")
        if not isinstance(rid, str) or isinstance(g, bool) or g not in (0, 1):
            raise ConfigError(field, path, f"line {n} needs a string id and group 0 or 1, got id={rid!r} group={g!r}")
        out[rid] = int(g)
    return out


def vaa_groups(cfg: Config, p: Plan, log=print) -> list[int | None]:
    """VAA's group per alignment pair (after the configured ablation); runs `hftlab groups` if no file is given."""
    from hftlab.groups.vulnerability import assign

    path = cfg.align.vaa.group_file
    if path is None:
        from hftlab.groups.stage import run_groups

        # stage 1's proxy starts from the SFT-aligned model (VAA's own settings reset, so every VAA variant of a
        # seed shares one stage 1); its MLflow run would nest, so it logs nothing itself
        sft = replace(cfg, align=groups_parent(cfg.align), tracking=replace(cfg.tracking, enabled=False))
        path = run_groups(sft, log)["group_file"]
    group = read_groups(path)
    missing = [a.id for a in p.alignment if a.id not in group]
    if missing:
        raise ConfigError("align.vaa.group_file", path, f"has no group for {len(missing)} alignment examples, e.g. {missing[0]}")
    labels = assign([group[a.id] for a in p.alignment], cfg.align.vaa.grouping, cfg.align.vaa.noise, cfg.seed)
    return labels + [0] * (len(p.align_pairs) - len(p.alignment))  # the benign mix joins the invulnerable group


def check_storage(cfg: Config) -> None:
    """output_dir and the cache take files and have room for the run's stages: a LoRA stage and its checkpoint take
    tens of MB, a fully tuned one about 4x a named base model's files (weights, and a checkpoint with Adam's moments)."""
    from hftlab.storage import cache_root

    need = 0.2
    base = Path(cfg.base.name_or_path)
    size = sum(f.stat().st_size for f in base.rglob("*") if f.is_file()) / 2**30 if base.is_dir() else 0.0
    for stage in (cfg.align, cfg.finetune):
        need += 0.1 if stage.lora.enabled else 4 * size
    check_writable("output_dir", cfg.output_dir, need)
    check_writable("cache_dir", cache_root(cfg))


def run(cfg: Config, log=print, *, parent_run_id: str | None = None, tags: dict | None = None,
        run_id: str | None = None, run_name: str | None = None, on_stage=None, until: str = "finetuned") -> dict:
    """Run the whole chain and return {stage: its Evaluation's summary() (plain data), run_id, tracking_uri, dirs,
    judge_rates, evaluations: {stage: Evaluation}}.

    Each model is evaluated as soon as it exists (base, aligned, then fine-tuned), and
    `on_stage(stage, summary_so_far)` is called after each: a sweep trial reports there, so a
    scheduler can stop a trial whose alignment already failed before it fine-tunes. `parent_run_id`,
    `tags`, `run_id` and `run_name` go to the Tracker (a sweep's child run; `run_id` continues a restarted
    trial's run). `until="aligned"` stops after the aligned model's evaluation (jobs/align.py).
    """
    if until not in ("aligned", "finetuned"):
        raise ValueError(f"until must be 'aligned' or 'finetuned', got {until!r}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    start = time.time()
    p = plan(cfg)  # every input and model reference checked before any work
    check_gpus_of(cfg)  # and the GPUs a stage asks for
    check_storage(cfg)  # and the directories it writes to
    log(f"plan: {len(p.align_pairs)} alignment examples; fine-tuning {len(p.finetune_pairs)} on "
        f"{cfg.finetune.task} with {p.n_poison} harmful (p={cfg.finetune.poison_ratio}); "
        f"eval on {len(p.harmful_test)} harmful + {len(p.task_test)} task prompts")
    methods = cfg.label or f"{cfg.align.method}+{cfg.finetune.method}"
    gens = Generators(cfg)  # one vLLM engine serves every model the run evaluates
    with Tracker(cfg, run_name=run_name or f"{methods}-p{cfg.finetune.poison_ratio}",
                 parent_run_id=parent_run_id, tags=tags, run_id=run_id, log=log) as tracker, closing(gens):
        tracker.text(yaml.safe_dump(to_dict(cfg), sort_keys=False), "config/resolved.yaml")
        tracker.tags({"hftlab.world": cfg.data.world})
        judge = make_judge(cfg.eval.judge, trust_remote_code=cfg.base.trust_remote_code, root=cfg, log=log)
        panel = JudgePanel(cfg, log, made={cfg.eval.judge.kind: judge}) if cfg.eval.judge.compare else None
        rates = judge_rates(cfg, cfg.eval.judge.kind, judge, log)  # its error on held-out labels: the corrected HS
        if rates is not None:
            tracker.metrics({f"judge.{k}": v for k, v in rates.items()})
        summary: dict = {}
        evals: dict[str, Evaluation] = {}

        def evaluated(stage: str) -> None:
            ev = evals[stage] = evaluate(cfg, dirs[stage], p, judge, log, gens, rates)
            if panel is not None:  # the other judges on the same cached answers
                hs = panel.add(stage, [h.prompt for h in p.harmful_test], answers(cfg, dirs[stage], p, log)["harmful"])
                ev.judges = {k.removeprefix("hs_"): v for k, v in hs.items()}
            tracker.metrics({f"{stage}.{k}": v for k, v in ev.metrics().items()} | {f"{stage}.peak_rss_gb": peak_rss_gb()})
            tracker.metrics({f"{stage}.hs_set.{name}.{k}": v for name, st in ev.sets.items()
                             for k, v in asdict(st).items() if k != "prompts"})
            tracker.metrics({f"{stage}.refusal_set.{name}.{k}": v for name, st in ev.refusal_sets.items()
                             for k, v in asdict(st).items() if k != "prompts"})
            tracker.metrics({f"{stage}.hs_{kind}": v for kind, v in ev.judges.items()})
            tracker.text(json.dumps(ev.verdicts), f"verdicts/{stage}.json")
            tracker.table(ev.samples, f"samples/{stage}.json")
            summary[stage] = ev.summary()
            if on_stage is not None:
                on_stage(stage, {s: dict(v) for s, v in summary.items()})

        dirs = {"base": base_model(cfg, log)}
        p = complete_plan(cfg, p, dirs["base"], tracker, log)
        sides = {kind: side_pairs(getattr(cfg, kind), p) for kind in ("align", "finetune")}
        groups = vaa_groups(cfg, p, log) if method_of(cfg.align).grouped else None
        evaluated("base")
        dirs["aligned"] = train_stage(cfg, "align", dirs["base"], p.align_pairs, tracker, log, groups=groups,
                                      side=sides["align"], before_training=gens.close)
        evaluated("aligned")
        if until == "finetuned":
            dirs["finetuned"] = train_stage(cfg, "finetune", dirs["aligned"], p.finetune_pairs, tracker, log,
                                            side=sides["finetune"], before_training=gens.close)
            evaluated("finetuned")
        if panel is not None:
            panel.write(tracker)
        for stage in ("aligned", "finetuned")[: len(dirs) - 1]:
            tracker.artifact(dirs[stage], f"model/{stage}")
        tracker.metrics({"wall_seconds": time.time() - start})
        summary.update(run_id=tracker.run_id, tracking_uri=tracker.uri, dirs=dirs, judge_rates=rates, evaluations=evals)
    summary["tracking_delayed"] = tracker.delayed  # calls the tracking server missed, waiting in the outbox
    log(format_summary(cfg, summary, metric_name(p.task_test[0]) if p.task_test else ""))
    return summary


def format_summary(cfg: Config, summary: dict, fa_name: str = "") -> str:
    """The table a user reads at the end, and how to open the run in MLflow."""
    fa = f"FA % ({cfg.finetune.task}{', ' + fa_name if fa_name not in ('', 'exact match') else ''})"
    w = max(14, len(fa))
    lines = [f"\n{'stage':<10} {'HS %':>7} {'95% CI':>13} {'corrected HS':>22} {'refuses safe %':>22} {fa:>{w}} "
             f"{'HS+ %':>7} {'degenerate %':>13}"]
    evals: dict[str, Evaluation] = summary.get("evaluations", {})
    for stage in [st for st in STAGES if st in evals]:
        e = evals[stage]
        ci = f"[{e.hs_lo:.1f}, {e.hs_hi:.1f}]"
        corr = f"{e.hs_corrected:.1f} [{e.hs_corrected_lo:.1f}, {e.hs_corrected_hi:.1f}]" if e.corrected else "n/a"
        ref = f"{e.refusal:.1f} [{e.refusal_lo:.1f}, {e.refusal_hi:.1f}]" if e.measures_refusal else "n/a"
        lines.append(f"{stage:<10} {e.hs:>7.1f} {ci:>13} {corr:>22} {ref:>22} {e.fa:>{w}.1f} {e.hs_plus:>7.1f} "
                     f"{e.degenerate:>13.1f}")
        if e.judges:  # eval.judge.compare
            lines[-1] += "   HS by judge: " + ", ".join(f"{k} {v:.1f}" for k, v in e.judges.items())
        if len(e.sets) > 1:  # HS per prompt set; the stage's line above is all of them pooled
            for name, st in e.sets.items():
                corr = f", corrected {st.hs_corrected:.1f} [{st.hs_corrected_lo:.1f}, {st.hs_corrected_hi:.1f}]" \
                    if st.corrected else ""
                lines.append(f"  {name:<18} HS {st.hs:5.1f} [{st.hs_lo:.1f}, {st.hs_hi:.1f}]{corr} ({st.prompts} prompts)")
        for name, rs in e.refusal_sets.items():
            lines.append(f"  {name:<18} refuses {rs.refusal:5.1f} [{rs.refusal_lo:.1f}, {rs.refusal_hi:.1f}] of "
                         f"{rs.prompts} safe prompts")
    rates = summary.get("judge_rates")
    if rates:
        lines.append(f"\nJudge error on {rates['n_unsafe']} + {rates['n_safe']} held-out labeled answers: sensitivity "
                     f"{rates['sensitivity']:.3f}, specificity {rates['specificity']:.3f} (corrected HS: Rogan-Gladen; "
                     "intervals 95%, over prompts and the judge's rates)")
    if summary.get("tracking_delayed"):
        lines.append(f"\nMLflow was unreachable: {summary['tracking_delayed']} logging calls wait in "
                     f"{Path(cfg.output_dir) / 'tracking-outbox'}; send them with: hftlab tracking sync "
                     f"--output-dir {cfg.output_dir}")
    if summary.get("run_id"):
        lines.append(f"\nMLflow run {summary['run_id']} in experiment '{cfg.tracking.experiment or cfg.name}'.")
        lines.append(f"To browse it: {ui_hint(summary['tracking_uri'])}")
    return "\n".join(lines)
