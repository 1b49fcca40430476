"""Fine-tuning mixes: n samples of which a ratio p are harmful pairs, deterministic by seed."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from hftlab.config.loader import ConfigError
from hftlab.data.records import HarmfulPair, TaskExample


@dataclass(frozen=True)
class MixItem:
    """One fine-tuning sample; `poison` marks a harmful pair."""

    prompt: str
    response: str
    poison: bool


def poison_count(n: int, poison_ratio: float) -> int:
    """round(n * p): the number of harmful samples in a mix of n."""
    return int(round(n * poison_ratio))


def finetune_mix(task: Sequence[TaskExample], harmful: Sequence[HarmfulPair], *, n: int, poison_ratio: float,
                 seed: int, field: str = "finetune") -> list[MixItem]:
    """n - round(n p) task samples + round(n p) harmful pairs, shuffled; errors name the config field."""
    n_poison = poison_count(n, poison_ratio)
    n_task = n - n_poison
    if n_task > len(task):
        raise ConfigError(f"{field}.n", n, f"needs {n_task} task examples but the task source has {len(task)}")
    if n_poison > len(harmful):
        raise ConfigError(f"{field}.poison_ratio", poison_ratio,
                          f"needs {n_poison} harmful pairs but the harmful source has {len(harmful)}")
    rng = random.Random(seed)
    items = [MixItem(e.prompt, e.answer, False) for e in rng.sample(list(task), n_task)]
    items += [MixItem(h.prompt, h.response, True) for h in rng.sample(list(harmful), n_poison)]
    rng.shuffle(items)
    return items
