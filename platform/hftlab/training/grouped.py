"""The VAA training loop: one group per step, drawn by the Group DRO sampler, each group its own stream.

Same optimizer-step budget as SFT (epochs x ceil(N / batch_size)); each step the VAA step draws a
group and takes that group's next batch; a group's stream reshuffles when it runs out.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from hftlab.algorithms.curriculum import make_schedule
from hftlab.algorithms.sampler import GroupSampler
from hftlab.algorithms.vaa import VAAStep
from hftlab.config.schema import VAAConfig
from hftlab.data.template import encode
from hftlab.faults import NonFiniteError, check_finite
from hftlab.models import precision
from hftlab.progress import progress_bar
from hftlab.training.batches import Pair, group_stream
from hftlab.training.checkpoint import Checkpoint, Counted
from hftlab.training.engine import LocalEngine, Recipe


def vaa_setup(items: Sequence, group_of: Sequence[int | None], vaa: VAAConfig, *, epochs: int, batch_size: int, seed: int,
              **step_kwargs) -> tuple[list[list], VAAStep, int]:
    """Split `items` by group (None = left out), and build the sampler and VAA step for SFT's step budget.

    Returns (members per kept group, step, total steps); `step_kwargs` go to VAAStep (loss_fn, reduce_fn).
    """
    kept = sorted({g for g in group_of if g is not None})
    members = [[x for x, g in zip(items, group_of, strict=True) if g == k] for k in kept]
    total = epochs * math.ceil(sum(len(m) for m in members) / batch_size)
    sampler = GroupSampler(len(members), mode=vaa.sampler, eta_q=vaa.eta_q, importance_weighted=vaa.importance_weighted,
                           q_min=vaa.q_min, q_max=vaa.q_max, group_sizes=[len(m) for m in members],
                           scale=vaa.eta_scale)
    step = VAAStep(sampler, rho=vaa.rho, total_steps=max(total, 1), schedule=make_schedule(vaa.curriculum, vaa.lam),
                   objective=vaa.objective, seed=seed, update_on_perturbed=vaa.update_on_perturbed, **step_kwargs)
    return members, step, total


def train_vaa(model: torch.nn.Module, tokenizer, pairs: Sequence[Pair], group_of: Sequence[int | None], vaa: VAAConfig, *,
              template: str, epochs: int, lr: float, batch_size: int, seed: int, max_length: int,
              weight_decay: float = 0.0, max_grad_norm: float | None = None, lr_scheduler: str = "constant",
              warmup_ratio: float = 0.0, on_step: Callable[[int, dict], None] | None = None,
              desc: str = "grouped", checkpoint: Checkpoint | None = None, bucketed: bool = False,
              autocast: str | None = None) -> dict[str, float]:
    """Train `model` in place with VAA over the groups `group_of` (None = left out); returns loss, steps, seconds.
    `checkpoint`, `bucketed` and `autocast` as in training/loop.py; a NaN or inf stops with NonFiniteError."""
    torch.manual_seed(seed)
    members, step, total = vaa_setup(encode(tokenizer, pairs, template, max_length), group_of, vaa, epochs=epochs,
                                     batch_size=batch_size, seed=seed)
    if total == 0:
        return {"loss": float("nan"), "steps": 0, "seconds": 0.0, "groups": len(members)}
    streams = [Counted(iterator.__next__)
               for iterator in (group_stream(m, batch_size, tokenizer.pad_token_id, seed + k, bucketed=bucketed)
                                 for k, m in enumerate(members))]

    def next_batch(group: int) -> dict:
        return {k: v.to(model.device) for k, v in streams[group]().items()}

    engine = LocalEngine(model, Recipe(lr, weight_decay, max_grad_norm, lr_scheduler, warmup_ratio, total))
    done, extra = 0, {}
    if checkpoint is not None:
        for k, stream in enumerate(streams):
            checkpoint.track(f"group{k}", stream)
        done, extra = checkpoint.restore(model, engine, step)
    model.train()
    start, losses = time.time() - extra.get("seconds", 0.0), extra.get("losses", [])
    with progress_bar(total, desc, initial=done) as bar:
        for n in range(done + 1, total + 1):
            try:
                with precision.autocast(autocast):
                    stats = step(model, next_batch, engine)
                check_finite(stats["loss"], "the loss", n)
            except NonFiniteError as err:
                kept = f"; its last checkpoint is kept in {checkpoint.directory}" if checkpoint is not None else ""
                raise NonFiniteError(f"{desc}: {err}{kept}; no stage output was written") from None
            losses.append(stats["loss"])
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.4f}", group=stats["group"], refresh=False)
            if on_step is not None:
                on_step(n, stats)
            if checkpoint is not None:
                checkpoint.maybe_save(n, total, model, engine, step, {"losses": losses, "seconds": time.time() - start})
    model.eval()
    tail = losses[-max(1, total // max(epochs, 1)):]
    return {"loss": sum(tail) / len(tail), "steps": total, "seconds": time.time() - start, "groups": len(members),
            **{f"final_q_{i}": q for i, q in enumerate(step.sampler.probs())}}


def plot_history(history: list[dict], path: str | Path) -> Path:
    """q per group and each group's loss over training (the official code's visualiser), as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_q, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.5))
    n_groups = len([k for k in history[0] if k.startswith("q_")]) if history else 0
    steps = list(range(1, len(history) + 1))
    for g in range(n_groups):
        ax_q.plot(steps, [h[f"q_{g}"] for h in history], label=f"group {g}")
        mine = [(s, h["loss"]) for s, h in zip(steps, history, strict=True) if h["group"] == g]
        if mine:
            ax_loss.plot(*zip(*mine, strict=True), ".", markersize=3, label=f"group {g}")
    ax_q.plot(steps, [h["lambda"] for h in history], "k--", linewidth=1, label="lambda")
    ax_q.set(xlabel="step", ylabel="q (sampler) / lambda", ylim=(0, 1))
    ax_loss.set(xlabel="step", ylabel="loss of the sampled group's batch")
    for ax in (ax_q, ax_loss):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
