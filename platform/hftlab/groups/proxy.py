"""The proxy harmful fine-tuning: from the aligned model, keep T checkpoints along the way.

Checkpoint 0 is the aligned model itself; checkpoints 1..T are saved every k optimizer steps
(or at each epoch's end) through the same save path as any stage, so they load like any model.
A proxy killed mid-way resumes from its last checkpoint (training/checkpoint.py), like a training stage.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from hftlab.config.loader import digest
from hftlab.config.schema import Config, ProxyConfig
from hftlab.data.mixing import finetune_mix
from hftlab.data.records import HarmfulPair, TaskExample
from hftlab.models import precision
from hftlab.models.loading import for_training, load_model, save_stage
from hftlab.resources import kernel_threads
from hftlab.storage import atomic_write_text, computed_once
from hftlab.training.checkpoint import Checkpoint
from hftlab.training.loop import train


def run_proxy(cfg: Config, proxy: ProxyConfig, aligned_dir: str, task: list[TaskExample], harmful: list[HarmfulPair],
              log=print) -> list[str]:
    """Fine-tune a copy of the aligned model on the proxy mix; return [aligned, ckpt 1, ..., ckpt T]."""
    seed = cfg.seed if proxy.seed is None else proxy.seed
    mix = finetune_mix(task, harmful, n=proxy.n, poison_ratio=proxy.poison_ratio, seed=seed, field="groups.proxies")
    pairs = [(m.prompt, m.response) for m in mix]
    key = digest({"parent": aligned_dir, "proxy": proxy, "pairs": pairs, "seed": seed, "template": cfg.data.template,
                  **precision.training_key(cfg.base.dtype)})
    out = Path(cfg.output_dir) / f"proxy-{key}"
    done = out / "checkpoints.json"
    with computed_once(out, done.is_file, log) as todo:  # racing runs: one trains the proxy, the others wait
        if todo:
            _train_proxy(cfg, proxy, aligned_dir, pairs, seed, out, log)
        else:
            log(f"[proxy] reusing {out}")
    return [aligned_dir] + [str(out / name) for name in json.loads(done.read_text())]


def _train_proxy(cfg: Config, proxy: ProxyConfig, aligned_dir: str, pairs: list, seed: int, out: Path, log) -> None:
    """Train into `.partial-<out>` (kept across a kill), with a training checkpoint at every proxy checkpoint: a rerun
    continues from the last one (its saved proxy checkpoints reused, the rest equal to an uninterrupted run's), and
    the directory is renamed to `out` only when every checkpoint and checkpoints.json are in it."""
    every = proxy.checkpoint_every or math.ceil(len(pairs) / proxy.batch_size)  # 0 -> once per epoch
    total = math.ceil(len(pairs) / proxy.batch_size) * proxy.epochs
    at = sorted({s for s in range(every, total + 1, every)} | {total})  # the steps a proxy checkpoint is saved at
    names = [f"ckpt-{i + 1}" for i in range(len(at))]
    model, tokenizer = load_model(aligned_dir, dtype=precision.weights_for_training(cfg.base.dtype),
                                  trust_remote_code=cfg.base.trust_remote_code)
    model = for_training(model, cfg.base.gradient_checkpointing, cfg.base.recompute_every_n_layers)
    work = out.parent / f".partial-{out.name}"
    state = Checkpoint(out.parent / f".ckpt-{out.name}", every, log)

    def on_step(step: int, stats: dict) -> None:
        if step in at:  # a checkpoint left by a killed run is the same model: save_stage keeps the first copy
            model.eval()
            save_stage(model, tokenizer, work / names[at.index(step)], parent=aligned_dir)
            model.train()

    log(f"[proxy] {proxy.task} p={proxy.poison_ratio}: {len(pairs)} examples x {proxy.epochs} epochs, "
        f"checkpoint every {every} steps, {kernel_threads()}")
    train(model, tokenizer, pairs, template=cfg.data.template, epochs=proxy.epochs, lr=proxy.lr,
          batch_size=proxy.batch_size, seed=seed, max_length=cfg.base.max_length, on_step=on_step,
          desc=f"proxy {proxy.task} p={proxy.poison_ratio}", checkpoint=state, bucketed=proxy.bucketed,
          autocast=precision.autocast_dtype(cfg.base.dtype))
    missing = [n for n in names if not (work / n).is_dir()]
    if missing:
        raise RuntimeError(f"proxy {out.name}: checkpoints {missing} are missing from {work}: delete it to retrain")
    atomic_write_text(work / "checkpoints.json", json.dumps(names))
    os.rename(work, out)
    state.clear()
