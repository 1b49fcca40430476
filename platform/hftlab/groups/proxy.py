"""The proxy harmful fine-tuning: from the aligned model, keep T checkpoints along the way.

Checkpoint 0 is the aligned model itself; checkpoints 1..T are saved every k optimizer steps
(or at each epoch's end) through the same save path as any stage, so they load like any model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from hftlab.config.loader import digest
from hftlab.config.schema import Config, ProxyConfig
from hftlab.data.mixing import finetune_mix
from hftlab.data.records import HarmfulPair, TaskExample
from hftlab.models.loading import for_training, load_model, save_stage
from hftlab.storage import atomic_dir, computed_once
from hftlab.training.loop import train


def run_proxy(cfg: Config, proxy: ProxyConfig, aligned_dir: str, task: list[TaskExample], harmful: list[HarmfulPair],
              log=print) -> list[str]:
    """Fine-tune a copy of the aligned model on the proxy mix; return [aligned, ckpt 1, ..., ckpt T]."""
    seed = cfg.seed if proxy.seed is None else proxy.seed
    mix = finetune_mix(task, harmful, n=proxy.n, poison_ratio=proxy.poison_ratio, seed=seed, field="groups.proxies")
    pairs = [(m.prompt, m.response) for m in mix]
    key = digest({"parent": aligned_dir, "proxy": proxy, "pairs": pairs, "seed": seed, "template": cfg.data.template})
    out = Path(cfg.output_dir) / f"proxy-{key}"
    done = out / "checkpoints.json"
    with computed_once(out, done.is_file, log) as todo:  # racing runs: one trains the proxy, the others wait
        if todo:
            _train_proxy(cfg, proxy, aligned_dir, pairs, seed, out, log)
        else:
            log(f"[proxy] reusing {out}")
    return [aligned_dir] + [str(out / name) for name in json.loads(done.read_text())]


def _train_proxy(cfg: Config, proxy: ProxyConfig, aligned_dir: str, pairs: list, seed: int, out: Path, log) -> None:
    every = proxy.checkpoint_every or math.ceil(len(pairs) / proxy.batch_size)  # 0 -> once per epoch
    total = math.ceil(len(pairs) / proxy.batch_size) * proxy.epochs
    model, tokenizer = load_model(aligned_dir, dtype=cfg.base.dtype, trust_remote_code=cfg.base.trust_remote_code)
    model = for_training(model, cfg.base.gradient_checkpointing)
    with atomic_dir(out) as tmp:
        names: list[str] = []

        def on_step(step: int, stats: dict) -> None:
            if step % every == 0 or step == total:
                name = f"ckpt-{len(names) + 1}"
                model.eval()
                save_stage(model, tokenizer, tmp / name, parent=aligned_dir)
                model.train()
                names.append(name)

        log(f"[proxy] {proxy.task} p={proxy.poison_ratio}: {len(pairs)} examples x {proxy.epochs} epochs, "
            f"checkpoint every {every} steps")
        train(model, tokenizer, pairs, template=cfg.data.template, epochs=proxy.epochs, lr=proxy.lr,
              batch_size=proxy.batch_size, seed=seed, max_length=cfg.base.max_length, on_step=on_step,
              desc=f"proxy {proxy.task} p={proxy.poison_ratio}")
        (tmp / "checkpoints.json").write_text(json.dumps(names))

