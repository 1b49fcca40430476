"""The main pipeline: base -> alignment -> harmful fine-tuning -> evaluation of all three.

Reads top to bottom. `plan()` loads and checks every input first, so a bad config or a bad
data file fails before any model is built. Each stage writes its output atomically under a key
hashed from everything that made it, so a rerun reuses finished stages and a crash loses nothing.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from hftlab.config.loader import ConfigError, digest, to_dict
from hftlab.config.schema import Config, VAAConfig
from hftlab.data import sources
from hftlab.data.mixing import finetune_mix
from hftlab.data.records import AlignmentPair, HarmfulPair, TaskExample, score
from hftlab.data.toyworld import build_world
from hftlab.generation.hf import HFGenerator
from hftlab.judges import make_judge
from hftlab.metrics import METRICS, degenerate_rate, empty_rate, finetune_accuracy, harmful_score, is_degenerate
from hftlab.models.loading import add_lora, load_model, save_stage
from hftlab.storage import atomic_dir, atomic_write_text
from hftlab.tracking import Tracker, ui_hint
from hftlab.training.batches import encode
from hftlab.training.loop import train
from hftlab.training.methods import side_data

STAGES = ("base", "aligned", "finetuned")


@dataclass
class Plan:
    """Everything the run will train on and evaluate, loaded and checked up front."""

    alignment: list[AlignmentPair]
    align_pairs: list[tuple[str, str]]
    harmful: list[HarmfulPair]
    defense_harmful: list[HarmfulPair]
    proxy_tasks: dict[str, list[TaskExample]]
    finetune_pairs: list[tuple[str, str]]
    n_poison: int
    harmful_test: list[HarmfulPair]
    task_test: list[TaskExample]


def plan(cfg: Config, proxies: bool = False) -> Plan:
    """Load the data the config names and check every size against it; raises ConfigError.

    With `proxies`, also the task data of VAA's proxy runs (cfg.groups.proxies).
    """
    if cfg.data.world == "real" and cfg.base.name_or_path == "tiny":
        raise ConfigError("base.name_or_path", "tiny", "the tiny model only knows the toy world's words")
    if cfg.data.world == "real" and cfg.align.n_benign > 0:
        raise ConfigError("align.n_benign", cfg.align.n_benign, "benign mixing needs data.world=toy")
    rng = random.Random(cfg.seed)
    benign: list[TaskExample] = []
    if cfg.data.world == "toy":
        world = build_world(cfg.data.toy)
        alignment: list[AlignmentPair] = world.alignment
        harmful, harmful_test = world.poison, world.test_harmful
        defense_harmful = world.alignment_harmful  # never the attack's poison or the HS test prompts
        task_train, task_test = world.task_train[cfg.finetune.task], world.task_test[cfg.finetune.task]
        benign = [ex for examples in world.task_train.values() for ex in examples]
        proxy_tasks = {px.task: world.task_train[px.task] for px in cfg.groups.proxies} if proxies else {}
    else:
        alignment = sources.load_pairs(cfg.data.alignment_source, "data.alignment_source", safe=True)
        harmful = sources.load_pairs(cfg.data.harmful_source, "data.harmful_source", safe=False)
        harmful_test = sources.load_pairs(cfg.data.harmful_test_source, "data.harmful_test_source", safe=False)
        defense_harmful = harmful  # BeaverTails' unsafe training pairs: the attack samples from the same pool
        task_train = sources.load_task(cfg.finetune.task, cfg.finetune.train_source, "finetune.train_source", test=False)
        task_test = sources.load_task(cfg.finetune.task, cfg.finetune.test_source, "finetune.test_source", test=True)
        proxy_tasks = ({px.task: sources.load_task(px.task, None, "groups.proxies.task", test=False)
                        for px in cfg.groups.proxies} if proxies else {})

    n_align = cfg.align.n_alignment or len(alignment)
    if n_align > len(alignment):
        raise ConfigError("align.n_alignment", n_align, f"the alignment source has {len(alignment)} pairs")
    if cfg.align.n_benign > len(benign) and cfg.data.world == "toy":
        raise ConfigError("align.n_benign", cfg.align.n_benign, f"the toy world has {len(benign)} benign examples")
    align_pairs = [(a.prompt, a.response) for a in alignment[:n_align]]
    align_pairs += [(b.prompt, b.answer) for b in rng.sample(benign, cfg.align.n_benign)]
    mix = finetune_mix(task_train, harmful, n=cfg.finetune.n, poison_ratio=cfg.finetune.poison_ratio, seed=cfg.seed)
    return Plan(
        alignment=alignment[:n_align],
        align_pairs=align_pairs,
        harmful=list(harmful),
        defense_harmful=list(defense_harmful),
        proxy_tasks=proxy_tasks,
        finetune_pairs=[(m.prompt, m.response) for m in mix],
        n_poison=sum(m.poison for m in mix),
        harmful_test=harmful_test[: cfg.eval.n_harmful or len(harmful_test)],
        task_test=task_test[: cfg.eval.n_task or len(task_test)],
    )


def base_model(cfg: Config, log=print) -> str:
    """The base model's name or directory (the tiny one is built once per machine, then cached)."""
    if cfg.base.name_or_path != "tiny":
        return cfg.base.name_or_path
    from hftlab.models.tiny import ensure_tiny_base

    return str(ensure_tiny_base(cfg, log=log))


def vaa_groups(cfg: Config, p: Plan, log=print) -> list[int | None]:
    """VAA's group per alignment pair (after the configured ablation); runs `hftlab groups` if no file is given."""
    from dataclasses import replace

    from hftlab.groups.vulnerability import assign

    path = cfg.align.vaa.group_file
    if path is None:
        from hftlab.groups.stage import run_groups

        # stage 1's proxy starts from the SFT-aligned model (VAA's own settings reset, so every VAA variant of a
        # seed shares one stage 1); its MLflow run would nest, so it logs nothing itself
        sft = replace(cfg, align=replace(cfg.align, method="sft", vaa=VAAConfig()), tracking=replace(cfg.tracking, enabled=False))
        path = run_groups(sft, log)["group_file"]
    if not Path(path).is_file():
        raise ConfigError("align.vaa.group_file", path, "no such file")
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    group = {r["id"]: int(r["group"]) for r in rows}
    missing = [a.id for a in p.alignment if a.id not in group]
    if missing:
        raise ConfigError("align.vaa.group_file", path, f"has no group for {len(missing)} alignment examples, e.g. {missing[0]}")
    labels = assign([group[a.id] for a in p.alignment], cfg.align.vaa.grouping, cfg.align.vaa.noise, cfg.seed)
    return labels + [0] * (len(p.align_pairs) - len(p.alignment))  # the benign mix joins the invulnerable group


def side_pairs(stage_cfg, p: Plan) -> list[tuple[str, str]] | None:
    """The extra data a method trains with: SafeGrad's alignment pairs, Booster's and RepNoise's harmful pairs."""
    need = side_data(stage_cfg)
    if need == "alignment":
        n = stage_cfg.safegrad.n_alignment
        if n > len(p.alignment):
            raise ConfigError("finetune.safegrad.n_alignment", n, f"the alignment set has {len(p.alignment)} pairs")
        return [(a.prompt, a.response) for a in p.alignment[:n]]
    if need == "harmful":
        return [(h.prompt, h.response) for h in p.defense_harmful]
    return None


def train_stage(cfg: Config, kind: str, parent: str, pairs: list[tuple[str, str]], tracker: Tracker, log=print,
                groups: list[int | None] | None = None, side: list[tuple[str, str]] | None = None) -> str:
    """Train `parent` on `pairs` with cfg.<kind> and save the result; reuse it if this exact stage exists."""
    stage_cfg = getattr(cfg, kind)
    key = digest({"parent": parent, "cfg": stage_cfg, "pairs": pairs, "seed": cfg.seed, "groups": groups, "side": side,
                  "template": cfg.data.template, "max_length": cfg.base.max_length})
    out = Path(cfg.output_dir) / f"{kind}-{key}"
    if (out / "config.json").is_file() or (out / "adapter_config.json").is_file():
        log(f"[{kind}] reusing {out}")
        return str(out)
    if stage_cfg.workers > 1:
        from hftlab.training.trainer import train_distributed

        log(f"[{kind}] {stage_cfg.method} on Ray Train, {stage_cfg.workers} workers: {len(pairs)} examples")
        with atomic_dir(out) as tmp:
            metrics = train_distributed(stage_cfg, parent, pairs, tmp, workers=stage_cfg.workers, seed=cfg.seed,
                                        template=cfg.data.template, max_length=cfg.base.max_length,
                                        storage_path=str(Path(cfg.output_dir) / "ray"), groups=groups, side=side,
                                        max_failures=stage_cfg.max_failures)
        tracker.metrics({f"{kind}.final_loss": metrics.get("last_loss", float("nan"))})
        return str(out)
    model, tokenizer = load_model(parent, dtype=cfg.base.dtype, trust_remote_code=cfg.base.trust_remote_code)
    if stage_cfg.lora.enabled:
        model = add_lora(model, stage_cfg.lora)

    history: list[dict] = []

    def on_step(step: int, stats: dict) -> None:
        history.append(stats)
        if step % 10 == 0:  # loss, and for VAA the group, q, lambda and the perturbed loss
            tracker.metrics({f"{kind}.{k}": v for k, v in stats.items() if v == v}, step=step)

    log(f"[{kind}] {stage_cfg.method}: {len(pairs)} examples x {stage_cfg.epochs} epochs, lr {stage_cfg.lr}")
    common = dict(template=cfg.data.template, epochs=stage_cfg.epochs, lr=stage_cfg.lr, batch_size=stage_cfg.batch_size,
                  seed=cfg.seed, max_length=cfg.base.max_length, weight_decay=stage_cfg.weight_decay, on_step=on_step)
    if stage_cfg.method == "vaa":
        from hftlab.training.grouped import plot_history, train_vaa

        stats = train_vaa(model, tokenizer, pairs, groups, stage_cfg.vaa, **common)
        with tempfile.TemporaryDirectory() as tmp:
            tracker.artifact(plot_history(history, Path(tmp) / f"{kind}-q-and-group-losses.png"), "plots")
    else:
        from hftlab.training.methods import build_step, side_stream, step_budget

        def make_step(engine):  # the side stream is built here, once the model's device is known
            src = None
            if side is not None:
                bs = stage_cfg.safegrad.batch_size if stage_cfg.method == "safegrad" else stage_cfg.batch_size
                enc = encode(tokenizer, side, cfg.data.template, cfg.base.max_length)
                src = side_stream(enc, bs, tokenizer.pad_token_id, cfg.seed, model.device)
            return build_step(stage_cfg, engine, side=src, seed=cfg.seed)

        stats = train(model, tokenizer, pairs, make_step=make_step, max_steps=step_budget(stage_cfg, len(pairs)), **common)
    log(f"[{kind}] done in {stats['seconds']:.1f}s, final epoch loss {stats['loss']:.4f}")
    tracker.metrics({f"{kind}.train_seconds": stats["seconds"], f"{kind}.final_loss": stats["loss"],
                     f"{kind}.steps": stats["steps"], **{f"{kind}.{k}": v for k, v in stats.items() if k.startswith("final_q")}})
    save_stage(model, tokenizer, out, parent)
    return str(out)


def evaluate(cfg: Config, model_dir: str, p: Plan, judge) -> dict:
    """HS on the harmful test prompts and FA on the task test set; cached by model and eval config."""
    key = digest({"model": model_dir, "eval": cfg.eval, "metrics": METRICS, "template": cfg.data.template,
                  "harmful": [h.prompt for h in p.harmful_test], "task": [(t.prompt, t.answer) for t in p.task_test]})
    cache = Path(cfg.output_dir) / "evals" / f"{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    model, tokenizer = load_model(model_dir, dtype=cfg.base.dtype, trust_remote_code=cfg.base.trust_remote_code)
    gen = HFGenerator(model, tokenizer, template=cfg.data.template, max_new_tokens=cfg.eval.max_new_tokens,
                      batch_size=cfg.eval.batch_size)
    prompts = [h.prompt for h in p.harmful_test]
    answers = gen.generate(prompts)
    verdicts = judge.judge(prompts, answers)  # the raw prompt, never the template
    degenerate = [is_degenerate(a) for a in answers]
    predictions = gen.generate([t.prompt for t in p.task_test])
    n = cfg.eval.n_samples_logged
    result = {
        "hs": harmful_score([v and not d for v, d in zip(verdicts, degenerate, strict=True)]),
        "hs_plus": harmful_score([v or d for v, d in zip(verdicts, degenerate, strict=True)]),
        "degenerate": degenerate_rate(answers), "empty": empty_rate(answers),
        "fa": finetune_accuracy(p.task_test, predictions),
        "samples": {
            "kind": ["harmful"] * min(n, len(prompts)) + ["task"] * min(n, len(predictions)),
            "prompt": prompts[:n] + [t.prompt for t in p.task_test[:n]],
            "answer": answers[:n] + predictions[:n],
            "harmful_or_correct": verdicts[:n] + [score(t, a) for t, a in zip(p.task_test[:n], predictions[:n], strict=True)],
        },
    }
    atomic_write_text(cache, json.dumps(result))
    return result


def run(cfg: Config, log=print, *, parent_run_id: str | None = None, tags: dict | None = None,
        run_id: str | None = None, run_name: str | None = None, on_stage=None, until: str = "finetuned") -> dict:
    """Run the whole chain and return {stage: {hs, fa, empty}, run_id, tracking_uri}.

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
    p = plan(cfg)
    sides = {kind: side_pairs(getattr(cfg, kind), p) for kind in ("align", "finetune")}  # checked before any work
    log(f"plan: {len(p.align_pairs)} alignment examples; fine-tuning {len(p.finetune_pairs)} on "
        f"{cfg.finetune.task} with {p.n_poison} harmful (p={cfg.finetune.poison_ratio}); "
        f"eval on {len(p.harmful_test)} harmful + {len(p.task_test)} task prompts")
    methods = cfg.label or f"{cfg.align.method}+{cfg.finetune.method}"
    with Tracker(cfg, run_name=run_name or f"{methods}-p{cfg.finetune.poison_ratio}",
                 parent_run_id=parent_run_id, tags=tags, run_id=run_id) as tracker:
        tracker.text(yaml.safe_dump(to_dict(cfg), sort_keys=False), "config/resolved.yaml")
        tracker.tags({"hftlab.config_hash": digest(cfg), "hftlab.world": cfg.data.world})
        judge = make_judge(cfg.eval.judge, trust_remote_code=cfg.base.trust_remote_code)
        summary: dict = {}

        def evaluated(stage: str) -> None:
            result = evaluate(cfg, dirs[stage], p, judge)
            summary[stage] = {k: result[k] for k in METRICS}
            tracker.metrics({f"{stage}.{k}": v for k, v in summary[stage].items()})
            tracker.table(result["samples"], f"samples/{stage}.json")
            if on_stage is not None:
                on_stage(stage, {s: dict(v) for s, v in summary.items()})

        groups = vaa_groups(cfg, p, log) if cfg.align.method == "vaa" else None
        dirs = {"base": base_model(cfg, log)}
        evaluated("base")
        dirs["aligned"] = train_stage(cfg, "align", dirs["base"], p.align_pairs, tracker, log, groups=groups,
                                      side=sides["align"])
        evaluated("aligned")
        if until == "finetuned":
            dirs["finetuned"] = train_stage(cfg, "finetune", dirs["aligned"], p.finetune_pairs, tracker, log,
                                            side=sides["finetune"])
            evaluated("finetuned")
        for stage in ("aligned", "finetuned")[: len(dirs) - 1]:
            tracker.artifact(dirs[stage], f"model/{stage}")
        tracker.metrics({"wall_seconds": time.time() - start})
        summary.update(run_id=tracker.run_id, tracking_uri=tracker.uri, dirs=dirs)
    log(format_summary(cfg, summary))
    return summary


def format_summary(cfg: Config, summary: dict) -> str:
    """The table a user reads at the end, and how to open the run in MLflow."""
    lines = [f"\n{'stage':<10} {'HS %':>7} {'FA % (' + cfg.finetune.task + ')':>14} {'HS+ %':>7} {'degenerate %':>13}"]
    for stage in [st for st in STAGES if st in summary]:
        s = summary[stage]
        lines.append(f"{stage:<10} {s['hs']:>7.1f} {s['fa']:>14.1f} {s['hs_plus']:>7.1f} {s['degenerate']:>13.1f}")
    if summary.get("run_id"):
        lines.append(f"\nMLflow run {summary['run_id']} in experiment '{cfg.tracking.experiment or cfg.name}'.")
        lines.append(f"To browse it: {ui_hint(summary['tracking_uri'])}")
    return "\n".join(lines)
