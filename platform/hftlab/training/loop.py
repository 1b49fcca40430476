"""The training loop: pairs -> batches -> algorithm step, epoch after epoch."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch

from hftlab.algorithms.sft import sft_step
from hftlab.data.template import encode
from hftlab.faults import NonFiniteError, check_finite
from hftlab.models import precision
from hftlab.progress import progress_bar
from hftlab.training.batches import Pair, batches
from hftlab.training.checkpoint import Checkpoint
from hftlab.training.engine import LocalEngine, Recipe


def train(
    model: torch.nn.Module,
    tokenizer,
    pairs: Sequence[Pair],
    *,
    template: str,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    max_length: int = 512,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = None,
    lr_scheduler: str = "constant",
    warmup_ratio: float = 0.0,
    make_step: Callable[[LocalEngine], Callable] | None = None,
    max_steps: int | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    desc: str = "train",
    checkpoint: Checkpoint | None = None,
    bucketed: bool = False,
    autocast: str | None = None,
) -> dict[str, float]:
    """Train `model` in place; returns the final epoch's mean loss, step count and seconds.

    `make_step(engine)` builds the algorithm step (training/methods.py); default plain SFT. `max_steps` (default
    epochs x batches) ends training mid-epoch, or goes on into further epochs (compute-matched SFT). The optimizer
    follows the recipe (weight decay, clipping to max_grad_norm, lr schedule with warmup: training/engine.py).
    `checkpoint`: resume from its latest state and save one every `checkpoint.every` steps (training/checkpoint.py).
    A NaN or inf loss or gradient stops training with NonFiniteError naming `desc` and the step.
    `bucketed`: batches of rows of like length (training/batches.epoch_order); `autocast`: the step's forward and
    backward under bf16 autocast (models/precision.py), the weights and optimizer state staying as they are.
    """
    torch.manual_seed(seed)
    encoded = encode(tokenizer, pairs, template, max_length)
    total = epochs * math.ceil(len(encoded) / batch_size) if max_steps is None else max_steps
    engine = LocalEngine(model, Recipe(lr, weight_decay, max_grad_norm, lr_scheduler, warmup_ratio, max(total, 1)))
    step_fn = make_step(engine) if make_step is not None else sft_step
    step, extra = checkpoint.restore(model, engine, step_fn) if checkpoint is not None else (0, {})
    per_epoch = max(math.ceil(len(encoded) / batch_size), 1)
    epoch, epoch_losses = step // per_epoch, extra.get("epoch_losses", [float("nan")])
    model.train()
    start = time.time() - extra.get("seconds", 0.0)
    with progress_bar(total, desc, initial=step) as bar:
        while step < total:
            skip, epoch_losses = (step % per_epoch, epoch_losses) if step % per_epoch else (0, [])
            for batch in batches(encoded, batch_size, tokenizer.pad_token_id, seed, epoch, bucketed=bucketed):
                if skip:  # resumed mid-epoch: the batches this epoch had already trained on
                    skip -= 1
                    continue
                batch = {k: v.to(model.device) for k, v in batch.items()}
                try:
                    with precision.autocast(autocast):
                        stats = step_fn(model, batch, engine)
                    check_finite(stats["loss"], "the loss", step + 1)
                except NonFiniteError as err:
                    kept = f"; its last checkpoint is kept in {checkpoint.directory}" if checkpoint is not None else ""
                    raise NonFiniteError(f"{desc}: {err}{kept}; no stage output was written") from None
                epoch_losses.append(stats["loss"])
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.4f}", epoch=epoch + 1, refresh=False)
                if on_step is not None:
                    on_step(step, stats)
                if checkpoint is not None:
                    checkpoint.maybe_save(step, total, model, engine, step_fn,
                                          {"epoch_losses": epoch_losses, "seconds": time.time() - start})
                if step >= total:
                    break
            epoch += 1
    model.eval()
    return {"loss": sum(epoch_losses) / max(len(epoch_losses), 1), "steps": step, "seconds": time.time() - start}
