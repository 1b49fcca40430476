"""The pipeline's model stages: the base model, a training stage (alignment or fine-tuning), distilled refusals.

Each writes its output atomically under a key hashed from everything that made it, so a rerun reuses a
finished stage and a crash leaves none half-written. Evaluating a model is run/evaluation.py.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from hftlab.config.loader import digest
from hftlab.config.schema import Config
from hftlab.data.template import encode
from hftlab.models import precision
from hftlab.models.loading import add_lora, for_training, load_model, save_stage
from hftlab.models.stage_dir import is_model_dir
from hftlab.resources import kernel_threads, peak_rss_gb
from hftlab.run.inputs import Plan, with_refusals
from hftlab.storage import atomic_dir, computed_once
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
    with computed_once(out, lambda: is_model_dir(out), log) as todo:
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
            tracker.metrics({f"{kind}.{k}": v for k, v in stats.items() if not math.isnan(v)}, step=step)

    log(f"[{kind}] {stage_cfg.method}: {len(pairs)} examples x {stage_cfg.epochs} epochs, lr {stage_cfg.lr}, "
        f"{kernel_threads()}")
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
