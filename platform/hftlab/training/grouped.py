"""The VAA training loop: one group per step, drawn by the Group DRO sampler, each group its own stream.

Same optimizer-step budget as SFT (epochs x ceil(N / batch_size)); each step the VAA step draws a
group and takes that group's next batch; a group's stream reshuffles when it runs out.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from hftlab.algorithms.curriculum import make_schedule
from hftlab.algorithms.sampler import GroupSampler
from hftlab.algorithms.vaa import VAAStep
from hftlab.config.schema import VAAConfig
from hftlab.training.batches import Pair, collate, encode
from hftlab.training.engine import LocalEngine


def _stream(encoded: list, batch_size: int, pad_id: int, seed: int) -> Iterator[dict]:
    """Endless shuffled batches of one group."""
    epoch = 0
    while True:
        order = list(range(len(encoded)))
        random.Random(seed * 1000 + epoch).shuffle(order)  # the same order as training/trainer.py's slices
        for start in range(0, len(order), batch_size):
            yield collate([encoded[i] for i in order[start : start + batch_size]], pad_id)
        epoch += 1


def train_vaa(model: torch.nn.Module, tokenizer, pairs: Sequence[Pair], group_of: Sequence[int | None], vaa: VAAConfig, *,
              template: str, epochs: int, lr: float, batch_size: int, seed: int, max_length: int,
              weight_decay: float = 0.0, on_step: Callable[[int, dict], None] | None = None) -> dict[str, float]:
    """Train `model` in place with VAA over the groups `group_of` (None = left out); returns loss, steps, seconds."""
    torch.manual_seed(seed)
    kept = sorted({g for g in group_of if g is not None})
    members = [[p for p, g in zip(pairs, group_of, strict=True) if g == k] for k in kept]
    encoded = [encode(tokenizer, m, template, max_length) for m in members]
    total = epochs * math.ceil(sum(len(m) for m in members) / batch_size)
    if total == 0:
        return {"loss": float("nan"), "steps": 0, "seconds": 0.0, "groups": len(members)}
    sampler = GroupSampler(len(members), mode=vaa.sampler, eta_q=vaa.eta_q, importance_weighted=vaa.importance_weighted,
                           q_min=vaa.q_min, q_max=vaa.q_max, group_sizes=[len(m) for m in members])
    step = VAAStep(sampler, rho=vaa.rho, total_steps=total, schedule=make_schedule(vaa.curriculum, vaa.lam),
                   objective=vaa.objective, seed=seed)
    streams = [_stream(e, batch_size, tokenizer.pad_token_id, seed + k) for k, e in enumerate(encoded)]

    def next_batch(group: int) -> dict:
        return {k: v.to(model.device) for k, v in next(streams[group]).items()}

    engine = LocalEngine(model, lr, weight_decay)
    model.train()
    start, losses = time.time(), []
    for n in range(1, total + 1):
        stats = step(model, next_batch, engine)
        losses.append(stats["loss"])
        if on_step is not None:
            on_step(n, stats)
    model.eval()
    tail = losses[-max(1, total // max(epochs, 1)):]
    return {"loss": sum(tail) / len(tail), "steps": total, "seconds": time.time() - start, "groups": len(members),
            **{f"final_q_{i}": q for i, q in enumerate(sampler.probs())}}
