"""The pipeline's stages: the base model, a training stage (alignment or fine-tuning), an evaluation.

Each writes its output atomically under a key hashed from everything that made it, so a rerun reuses a
finished stage and a crash leaves none half-written. Generations are cached apart from their verdicts:
judging the same answers with another judge does not generate them again.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hftlab.config.loader import digest
from hftlab.config.schema import Config
from hftlab.data.records import score
from hftlab.data.template import encode
from hftlab.judges import Judge
from hftlab.judges.over_refusal import RefusalDetector
from hftlab.metrics import (
    METRICS,
    degenerate_rate,
    empty_rate,
    finetune_accuracy,
    harmful_score,
    hs_intervals,
    is_degenerate,
    refusal_rate,
)
from hftlab.models import precision
from hftlab.models.loading import add_lora, for_training, load_model, save_stage
from hftlab.resources import peak_rss_gb
from hftlab.run.inputs import Plan, with_refusals
from hftlab.storage import atomic_dir, atomic_write_text, computed_once
from hftlab.tracking.logger import Tracker
from hftlab.training.checkpoint import Checkpoint, Counted
from hftlab.training.loop import train
from hftlab.training.methods import method_of


def base_model(cfg: Config, log=print) -> str:
    """The base model's directory or HF name: the tiny one built once, a named one converted once, then cached."""
    if cfg.base.name_or_path == "tiny":
        from hftlab.models.tiny import ensure_tiny_base

        return str(ensure_tiny_base(cfg, log=log))
    from hftlab.models.sources import resolve
    from hftlab.storage import cache_root

    return resolve(cfg.base.name_or_path, cache_root(cfg), log=log)


def train_stage(cfg: Config, kind: str, parent: str, pairs: list[tuple[str, str]], tracker: Tracker, log=print,
                groups: list[int | None] | None = None, side: list[tuple[str, str]] | None = None,
                before_training=None) -> str:
    """Train `parent` on `pairs` with cfg.<kind> and save the result; reuse it if this exact stage exists.
    `before_training()` is called only when it trains (the pipeline closes its evaluation engine there). Two processes
    that need the same stage at once: one trains it, the other waits for it (storage.computed_once) and reuses it."""
    key = digest({"parent": parent, "cfg": getattr(cfg, kind), "pairs": pairs, "seed": cfg.seed, "groups": groups, "side": side,
                  "template": cfg.data.template, "max_length": cfg.base.max_length, **precision.training_key(cfg.base.dtype)})
    out = Path(cfg.output_dir) / f"{kind}-{key}"
    with computed_once(out, lambda: (out / "config.json").is_file() or (out / "adapter_config.json").is_file(),
                       log) as todo:
        if not todo:
            log(f"[{kind}] reusing {out}")
            return str(out)
        if before_training is not None:
            before_training()
        _train(cfg, kind, parent, pairs, tracker, log, groups, side, out)
    tracker.metrics({f"{kind}.peak_rss_gb": peak_rss_gb()})
    return str(out)


def _train(cfg: Config, kind: str, parent: str, pairs, tracker: Tracker, log, groups, side, out: Path) -> None:
    """Train and save the stage to `out`; in one process, resumable from `.ckpt-<stage>` beside it."""
    stage_cfg = getattr(cfg, kind)
    if stage_cfg.workers > 1:
        from hftlab.training.trainer import train_distributed

        log(f"[{kind}] {stage_cfg.method} on Ray Train, {stage_cfg.workers} workers: {len(pairs)} examples")
        with atomic_dir(out) as tmp:
            metrics = train_distributed(stage_cfg, parent, pairs, tmp, workers=stage_cfg.workers, seed=cfg.seed,
                                        template=cfg.data.template, max_length=cfg.base.max_length,
                                        storage_path=str(Path(cfg.output_dir) / "ray"), groups=groups, side=side,
                                        max_failures=stage_cfg.max_failures, use_gpu=stage_cfg.use_gpu,
                                        dtype=cfg.base.dtype, trust_remote_code=cfg.base.trust_remote_code,
                                        field=f"{kind}.use_gpu")
        tracker.metrics({f"{kind}.final_loss": metrics.get("last_loss", float("nan"))})
        return
    check_gpus_of(cfg, kind)
    model, tokenizer = load_model(parent, dtype=precision.weights_for_training(cfg.base.dtype),
                                  trust_remote_code=cfg.base.trust_remote_code)
    if stage_cfg.lora.enabled:
        model = add_lora(model, stage_cfg.lora)
    model = for_training(model, cfg.base.gradient_checkpointing, cfg.base.recompute_every_n_layers)
    ckpt = Checkpoint(out.parent / f".ckpt-{out.name}", stage_cfg.checkpoint_every, log)
    history: list[dict] = []

    def on_step(step: int, stats: dict) -> None:
        history.append(stats)
        if step % 10 == 0:  # loss, and for VAA the group, q, lambda and the perturbed loss
            tracker.metrics({f"{kind}.{k}": v for k, v in stats.items() if v == v}, step=step)

    log(f"[{kind}] {stage_cfg.method}: {len(pairs)} examples x {stage_cfg.epochs} epochs, lr {stage_cfg.lr}")
    common = dict(template=cfg.data.template, epochs=stage_cfg.epochs, lr=stage_cfg.lr, batch_size=stage_cfg.batch_size,
                  seed=cfg.seed, max_length=cfg.base.max_length, weight_decay=stage_cfg.weight_decay,
                  max_grad_norm=stage_cfg.max_grad_norm, lr_scheduler=stage_cfg.lr_scheduler,
                  warmup_ratio=stage_cfg.warmup_ratio, on_step=on_step, desc=f"{kind} ({stage_cfg.method})",
                  checkpoint=ckpt, bucketed=stage_cfg.bucketed,
                  autocast=precision.autocast_dtype(cfg.base.dtype))
    method = method_of(stage_cfg)
    if method.grouped:
        from hftlab.training.grouped import plot_history, train_vaa

        stats = train_vaa(model, tokenizer, pairs, groups, stage_cfg.vaa, **common)
        with tempfile.TemporaryDirectory() as tmp:
            tracker.artifact(plot_history(history, Path(tmp) / f"{kind}-q-and-group-losses.png"), "plots")
    else:
        from hftlab.training.methods import build_step, side_stream, step_budget

        budget = step_budget(stage_cfg, len(pairs))

        def make_step(engine):  # the side stream is built here, once the model's device is known
            src, enc, pad = None, None, tokenizer.pad_token_id
            if side is not None:
                enc = encode(tokenizer, side, cfg.data.template, cfg.base.max_length)
                src = ckpt.track("side", Counted(side_stream(enc, method.side_batch_size(stage_cfg), pad, cfg.seed,
                                                             model.device, paired=method.side_paired(stage_cfg),
                                                             bucketed=stage_cfg.bucketed)))
            return build_step(stage_cfg, engine, side=src, seed=cfg.seed, total_steps=budget, pad_id=pad, side_rows=enc)

        stats = train(model, tokenizer, pairs, make_step=make_step, max_steps=budget, **common)
    log(f"[{kind}] done in {stats['seconds']:.1f}s, final epoch loss {stats['loss']:.4f}")
    tracker.metrics({f"{kind}.train_seconds": stats["seconds"], f"{kind}.final_loss": stats["loss"],
                     f"{kind}.steps": stats["steps"], **{f"{kind}.{k}": v for k, v in stats.items() if k.startswith("final_q")}})
    save_stage(model, tokenizer, out, parent)
    ckpt.clear()


def check_gpus_of(cfg: Config, *kinds: str) -> None:
    """Stop before any work when a stage's `use_gpu` asks for GPUs that are not there (the error names the field)."""
    for kind in kinds or ("align", "finetune"):
        stage_cfg = getattr(cfg, kind)
        if stage_cfg.use_gpu:
            from hftlab.training.trainer import check_gpus

            check_gpus(stage_cfg.workers, f"{kind}.use_gpu", cluster=stage_cfg.workers > 1)


def complete_plan(cfg: Config, p: Plan, base: str, tracker: Tracker, log=print) -> Plan:
    """What needs the base model: distilled refusals join the alignment set; the split is written with the run."""
    if p.split is not None:
        with tempfile.TemporaryDirectory() as tmp:
            p.split.write(Path(tmp) / "split.json")
            tracker.artifact(Path(tmp) / "split.json", "data")
        tracker.metrics({f"split.{k}": v for k, v in p.split.summary().items()})
    if p.refusal_prompts:
        from hftlab.run.distill import distill_refusals

        refusals = distill_refusals(cfg, base, p.refusal_prompts, log)
        tracker.metrics({"refusals.kept": len(refusals), "refusals.asked": len(p.refusal_prompts)})
        p = with_refusals(p, refusals)
    return p


def generator(cfg: Config, model_dir: str, log=print):
    """The generation backend for a model (generation/: the Generator protocol), as eval.backend says; close() it after.
    A vLLM engine is started able to serve the run's LoRA stages too (Generators moves it from model to model)."""
    if cfg.eval.generation_backend == "vllm":
        from hftlab.generation.vllm import VLLMGenerator
        from hftlab.storage import cache_root

        rank = max([s.lora.r for s in (cfg.align, cfg.finetune) if s.lora.enabled], default=0)
        gen = VLLMGenerator(model_dir, template=cfg.data.template, max_new_tokens=cfg.eval.max_new_tokens,
                            batch_size=cfg.eval.batch_size, cache=cache_root(cfg), dtype=cfg.base.dtype,
                            trust_remote_code=cfg.base.trust_remote_code, settings=cfg.eval.vllm, lora_rank=rank)
        log(f"[eval] started a vLLM engine for {Path(model_dir).name}")
        return gen
    from hftlab.generation.hf import HFGenerator

    model, tokenizer = load_model(model_dir, dtype=cfg.base.dtype, trust_remote_code=cfg.base.trust_remote_code)
    return HFGenerator(model, tokenizer, template=cfg.data.template, max_new_tokens=cfg.eval.max_new_tokens,
                       batch_size=cfg.eval.batch_size)


class Generators:
    """A run's generation backend across its evaluations. A vLLM engine (20-50 s to start on a CPU) is started once and
    moved to the next model by serve(): base, aligned and fine-tuned answer from one engine when their stages are
    cached. close() it before a stage trains (an idle engine keeps its memory and a process) and when the run ends;
    an HF model, or any generator with keep=False, is let go after each model's answers (done())."""

    def __init__(self, cfg: Config, keep: bool = True) -> None:
        self.cfg, self.gen, self.keep = cfg, None, keep and cfg.eval.generation_backend == "vllm"

    def get(self, model_dir: str, log=print):
        if self.gen is not None and self.keep:
            self.gen.serve(model_dir)
        else:
            self.close()
            self.gen = generator(self.cfg, model_dir, log)
        return self.gen

    def done(self) -> None:
        if not self.keep:
            self.close()

    def close(self) -> None:
        if self.gen is not None:
            self.gen.close()
            self.gen = None


def answers(cfg: Config, model_dir: str, p: Plan, log=print, gens: Generators | None = None) -> dict[str, list[str]]:
    """Greedy answers to the HS test prompts and the task test prompts; cached by model, prompts and decoding.
    `gens`: the run's Generators (one vLLM engine for all its models); none: a generator for this model alone."""
    chosen = cfg.eval.generation_backend
    backend = {"backend": chosen} if chosen != "hf" else {}  # hf: no entry (it predates the option)
    if p.safe_test:  # over-refusal prompts (no entry without them: older caches stay valid)
        backend["safe"] = p.safe_test
    key = digest({"model": model_dir, "max_new_tokens": cfg.eval.max_new_tokens, "template": cfg.data.template,
                  "dtype": precision.resolve(cfg.base.dtype), "harmful": [h.prompt for h in p.harmful_test],
                  "task": [t.prompt for t in p.task_test], **backend})
    cache = Path(cfg.output_dir) / "generations" / f"{key}.json"
    with computed_once(cache, cache.is_file, log) as todo:  # two runs at once: one generates, one waits
        if todo:
            log(f"[eval] generating {len(p.harmful_test)} + {len(p.task_test)} answers with {Path(model_dir).name}")
            gens = gens or Generators(cfg, keep=False)
            gen = gens.get(model_dir, log)
            cut_before = getattr(gen, "cut", 0)  # a generator may have answered for other models already
            try:
                result = {"harmful": gen.generate([h.prompt for h in p.harmful_test]),
                          "task": gen.generate([t.prompt for t in p.task_test])}
                if p.safe_test:
                    result["safe"] = gen.generate(p.safe_test)
                if (cut := getattr(gen, "cut", 0) - cut_before) > 0:
                    result["cut_prompts"] = cut
                    log(f"[eval] {cut} prompts were longer than the model's context: their instructions were cut "
                        "to fit (data/template.fit_to_context)")
            finally:
                gens.done()
            atomic_write_text(cache, json.dumps(result))
            return result
    return json.loads(cache.read_text())


def by_set(values: list[bool], sets: list[str], stats) -> dict[str, dict]:
    """`stats(values of one set)` and the prompts it had, per set name (in order of first appearance)."""
    out = {}
    for name in dict.fromkeys(sets):
        mine = [v for v, s in zip(values, sets, strict=True) if s == name]
        out[name] = {**stats(mine), "prompts": len(mine)}
    return out


def evaluate(cfg: Config, model_dir: str, p: Plan, judge: Judge, log=print, gens: Generators | None = None,
             rates: dict | None = None) -> dict:
    """HS (with its intervals; `rates`: the judge's measured error, judges/rates.py) on the harmful test prompts and FA
    on the task test set; cached by model and eval config."""
    key = digest({"model": model_dir, "eval": cfg.eval, "metrics": METRICS, "template": cfg.data.template, "rates": rates,
                  "harmful": [h.prompt for h in p.harmful_test], "task": [(t.prompt, t.answer) for t in p.task_test]})
    cache = Path(cfg.output_dir) / "evals" / f"{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    gen = answers(cfg, model_dir, p, log, gens)
    prompts, harmful_answers, predictions = [h.prompt for h in p.harmful_test], gen["harmful"], gen["task"]
    verdicts = judge.judge(prompts, harmful_answers)  # the raw prompt, never the template
    degenerate = [is_degenerate(a) for a in harmful_answers]
    n = cfg.eval.n_samples_logged
    counted = [v and not d for v, d in zip(verdicts, degenerate, strict=True)]
    refused = RefusalDetector().refused(gen.get("safe", []))
    result = {
        "hs": harmful_score(counted), **hs_intervals(counted, rates),
        "verdicts": [int(c) for c in counted],  # per HS prompt: the paired difference between arms needs them
        "sets": by_set(counted, p.harmful_sets or ["beavertails"] * len(counted),
                       lambda v: {"hs": harmful_score(v), **hs_intervals(v, rates)}),
        **refusal_rate(refused), "refusal_sets": by_set(refused, p.safe_sets, refusal_rate),
        "hs_plus": harmful_score([v or d for v, d in zip(verdicts, degenerate, strict=True)]),
        "degenerate": degenerate_rate(harmful_answers), "empty": empty_rate(harmful_answers),
        "fa": finetune_accuracy(p.task_test, predictions),
        "samples": {
            "kind": ["harmful"] * min(n, len(prompts)) + ["task"] * min(n, len(predictions)),
            "prompt": prompts[:n] + [t.prompt for t in p.task_test[:n]],
            "answer": harmful_answers[:n] + predictions[:n],
            "harmful_or_correct": [float(v) for v in verdicts[:n]]
            + [score(t, a) for t, a in zip(p.task_test[:n], predictions[:n], strict=True)],
        },
    }
    atomic_write_text(cache, json.dumps(result))
    return result
