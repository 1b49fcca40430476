"""What a training method is to the platform: one `Method` record per method, in one registry.

The pipeline, the stages, the Ray Train workers, the planner, the sweeps and the cost model ask a stage's record
(`method_of(stage)`) what they need to know, and never compare method names: its side data, its passes per step, whether
it trains over vulnerability groups, how to build its step. The record type is training/method.py, the built-in
records are training/builtin_methods.py. Adding a method is an algorithm file (algorithms/), a record (in
builtin_methods.py, or `register(Method(...))` anywhere before the config loads) and, if it has settings, its config
dataclass as a field of the stage's config (docs/architecture.md).

Steps that need data besides the stage's own batches get it as `side`: encoded pairs turned into an endless stream
of this rank's slices (side_stream), used by the in-process loop (training/loop.py) and the Ray Train workers
(training/worker.py, under Ray Train or as train_local) alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from hftlab.training.builtin_methods import BUILTIN
from hftlab.training.method import KINDS, Batch, Method, Stage, StepInputs

if TYPE_CHECKING:
    import torch

SIDE_SEED = 7919  # the side stream's shuffle is its own, so adding it does not change the main batches' order

REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add (or replace) a method; the config accepts its name from then on."""
    if not callable(method.passes):
        raise ValueError(f"method {method.name!r}: `passes` (its cost per step) must be given as a function")
    if not method.kinds or any(k not in KINDS for k in method.kinds):
        raise ValueError(f"method {method.name!r}: kinds {method.kinds!r} must name stages among {KINDS}")
    if (method.build is None) != method.grouped:
        raise ValueError(f"method {method.name!r}: a grouped method has no `build` (grouped.py), any other one has one")
    REGISTRY[method.name] = method
    return method


for _builtin in BUILTIN:
    register(_builtin)


def names(kind: str) -> tuple[str, ...]:
    """The methods a stage ("align" or "finetune") accepts."""
    return tuple(name for name, m in REGISTRY.items() if kind in m.kinds)


def method_of(stage: Stage) -> Method:
    """The record of `stage.method` (the config only accepts registered names)."""
    return REGISTRY[stage.method]


def step_budget(stage: Stage, n_examples: int) -> int:
    """Optimizer steps of a stage: epochs x batches per epoch (a grouped method: over the examples in a group);
    compute-matched SFT (align.compute_match=<method>) takes as many steps as that method, with the stage's settings
    for it, would take passes (an SFT step is one pass)."""
    total = stage.epochs * math.ceil(n_examples / stage.batch_size)
    matched = getattr(stage, "compute_match", "none")
    if matched != "none" and total > 0:
        total = round(total * REGISTRY[matched].passes(stage, total))
    return total


def build_step(stage: Stage, engine, *, side: Callable[[], Batch] | None = None, loss_fn: Callable | None = None,
               seed: int = 0, total_steps: int = 0, pad_id: int = 0, side_rows: Sequence | None = None,
               reference: torch.nn.Module | None = None) -> Callable:
    """The step callable step(model, batch, engine) -> stats of `stage.method` (its record's build)."""
    from hftlab.algorithms.sft import causal_lm_loss

    method = method_of(stage)
    if method.build is None:
        raise ValueError(f"method={stage.method!r} is grouped: its loop is training/grouped.py, not a step built here")
    inputs = StepInputs(side, loss_fn or causal_lm_loss, seed, total_steps, pad_id, side_rows, reference)
    return method.build(stage, engine, inputs)


def side_stream(encoded: Sequence, batch_size: int, pad_id: int, seed: int, device: torch.device,
                rank: int = 0, world: int = 1, paired: bool = False, bucketed: bool = False) -> Callable[[], Batch]:
    """next() over endless shuffled batches of `encoded` (this rank's slices), moved to `device`. `paired`: the same
    shuffle as the stage's own batches (training/batches.py with `seed`), so row i of both is the same pair index;
    `bucketed`: rows of like length batched together (ignored when `paired`: the pairing is by row)."""
    from hftlab.training.batches import group_stream

    stream = group_stream(list(encoded), batch_size, pad_id, seed if paired else seed + SIDE_SEED, rank, world,
                          bucketed and not paired)
    return lambda: {k: v.to(device) for k, v in next(stream).items()}
