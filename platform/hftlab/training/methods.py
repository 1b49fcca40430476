"""What a training method is to the platform: one `Method` record per method, in one registry.

The pipeline, the stages, the Ray Train workers, the planner, the sweeps and the cost model ask a stage's record
(`method_of(stage)`) what they need to know, and never compare method names: its side data, its passes per step, whether
it trains over vulnerability groups, how to build its step. The built-in records are in training/records.py; adding a
method is an algorithm file (algorithms/), a record there (or `register(Method(...))` anywhere before the config
loads) and, if it has settings, its config dataclass as a field of the stage's config (docs/architecture.md).

Steps that need data besides the stage's own batches get it as `side`: encoded pairs turned into an endless stream
of this rank's slices (side_stream), used by the in-process loop (training/loop.py) and the Ray Train workers
(training/trainer.py) alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # the config validates method names against this registry: importing it must not load torch
    import torch

Batch = dict[str, Any]  # input_ids, attention_mask, labels: tensors
Stage = Any  # AlignConfig | FinetuneConfig (config/stages.py; not imported: the config asks this registry)
SIDE_SEED = 7919  # the side stream's shuffle is its own, so adding it does not change the main batches' order
KINDS = ("align", "finetune")
BASELINE = "sft"
"""The method every other one is measured against (plain SFT): the groups stage's parent, an attack's reference."""


@dataclass(frozen=True)
class StepInputs:
    """What a training path hands a record's `build`, besides the stage config and the engine."""

    side: Callable[[], Batch] | None = None
    """next() over the side pairs' batches (None: the method has no side data)."""
    loss_fn: Callable | None = None
    """The loss of one batch (None: algorithms/sft.causal_lm_loss; a Ray Train worker's token-sum loss)."""
    seed: int = 0
    """The run's seed (a method's own randomness)."""
    total_steps: int = 0
    """The stage's optimizer step budget (step_budget)."""
    pad_id: int = 0
    """The tokenizer's padding id."""
    side_rows: Sequence | None = None
    """The encoded side pairs (SafeGrad caches its reference over them)."""
    reference: torch.nn.Module | None = None
    """The parent loaded apart, when the record asks for one (`reference_apart`)."""


def _stage_batch_size(stage: Stage) -> int:
    return stage.batch_size


def _never(stage: Stage) -> bool:
    return False


def _no_checks(stage: Stage) -> None:
    return None


@dataclass(frozen=True)
class Method:
    """One training method, as every part of the platform sees it."""

    name: str
    """The value of align.method / finetune.method."""
    kinds: tuple[str, ...]
    """The stages it may train: "align", "finetune" or both."""
    passes: Callable[[Stage, int], float]
    """passes(stage, total_steps): forward+backward passes per optimizer step relative to an SFT step (the cost model
    of `hftlab plan`, and compute-matched SFT). Required: a method without a cost is an error."""
    build: Callable[[Stage, Any, StepInputs], Callable] | None = None
    """build(stage, engine, inputs) -> step(model, batch, engine) -> stats. None for a grouped method, whose loop draws
    its own batches per group (training/grouped.py)."""
    side: Literal["alignment", "harmful"] | None = None
    """The pairs it trains on besides the stage's own: the alignment pairs, the harmful pairs, or none."""
    side_batch_size: Callable[[Stage], int] = _stage_batch_size
    """Side examples per step."""
    side_limit: Callable[[Stage], tuple[str, int | None]] | None = None
    """(dotted field, n): how many alignment pairs the side data takes (null: all), and the field that says so."""
    side_paired: Callable[[Stage], bool] = _never
    """The side pairs line up with the stage's own (row i with row i): their stream follows the main order."""
    grouped: bool = False
    """Trains over vulnerability groups: the pipeline assigns them, and training/grouped.py runs its loop."""
    groups_stage: Callable[[Stage], bool] = _never
    """The run computes the groups first (`hftlab groups`, on Ray actors) rather than reading a group file."""
    reference_apart: Callable[[Stage], bool] = _never
    """A Ray Train worker loads the parent apart for the step (after a resume the model is the checkpoint)."""
    check: Callable[[Stage], None] = _no_checks
    """Checks of the stage's config that only this method needs (raise config.errors.ConfigError)."""


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


def names(kind: str) -> tuple[str, ...]:
    """The methods a stage ("align" or "finetune") accepts."""
    import hftlab.training.records  # noqa: F401  (the built-in records register themselves)

    return tuple(name for name, m in REGISTRY.items() if kind in m.kinds)


def method_of(stage: Stage) -> Method:
    """The record of `stage.method` (the config only accepts registered names)."""
    import hftlab.training.records  # noqa: F401

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


def build_sft(stage: Stage, engine, inputs: StepInputs) -> Callable:
    """Plain SFT's step (algorithms/sft.sft_step, looked up at call time, so a test can wrap it)."""
    from hftlab.algorithms import sft

    return lambda model, batch, eng: sft.sft_step(model, batch, eng, loss_fn=inputs.loss_fn)


def side_stream(encoded: Sequence, batch_size: int, pad_id: int, seed: int, device: torch.device,
                rank: int = 0, world: int = 1, paired: bool = False, bucketed: bool = False) -> Callable[[], Batch]:
    """next() over endless shuffled batches of `encoded` (this rank's slices), moved to `device`. `paired`: the same
    shuffle as the stage's own batches (training/batches.py with `seed`), so row i of both is the same pair index;
    `bucketed`: rows of like length batched together (ignored when `paired`: the pairing is by row)."""
    from hftlab.training.grouped import group_stream

    stream = group_stream(list(encoded), batch_size, pad_id, seed if paired else seed + SIDE_SEED, rank, world,
                          bucketed and not paired)
    return lambda: {k: v.to(device) for k, v in next(stream).items()}
