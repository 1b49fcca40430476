"""The record of a training method (`Method`): everything the platform needs to know of it, declared once.

The registry is training/methods.py; the built-in records are training/builtin_methods.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # the config validates method names against the registry: importing it must not load torch
    import torch

Batch = dict[str, Any]  # input_ids, attention_mask, labels: tensors
Stage = Any  # AlignConfig | FinetuneConfig (config/stages.py; not imported: the config asks the registry)
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


def build_sft(stage: Stage, engine, inputs: StepInputs) -> Callable:
    """Plain SFT's step (algorithms/sft.sft_step, looked up at call time, so a test can wrap it)."""
    from hftlab.algorithms import sft

    return lambda model, batch, eng: sft.sft_step(model, batch, eng, loss_fn=inputs.loss_fn)
