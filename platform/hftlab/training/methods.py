"""From a stage's config to its algorithm step: the one place that maps `method` to a core in algorithms/.

Used by the in-process loop (training/loop.py) and by the Ray Train workers (training/trainer.py), so both run the
same step. VAA is built by training/grouped.py (it draws its own batches per group). Steps that need data besides
the stage's own batches (SafeGrad: alignment pairs; Booster, RepNoise: harmful pairs) get it as `side`, encoded
pairs turned into an endless stream of this rank's slices.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from functools import partial

import torch

from hftlab.algorithms.sft import causal_lm_loss, sft_step
from hftlab.config.schema import AlignConfig, FinetuneConfig

Batch = dict[str, torch.Tensor]
SIDE_SEED = 7919  # the side stream's shuffle is its own, so adding it does not change the main batches' order


def side_data(stage: AlignConfig | FinetuneConfig) -> str | None:
    """What extra pairs the stage's method needs: "alignment", "harmful" or None."""
    if stage.method == "safegrad":
        return "alignment"
    if stage.method in ("booster", "repnoise"):
        return "harmful"
    return None


def step_budget(stage: AlignConfig | FinetuneConfig, n_examples: int) -> int:
    """Optimizer steps of a stage: epochs x batches per epoch; compute-matched SFT (align.compute_match=vaa) takes as
    many steps as VAA with `stage.vaa` would take backward passes (its whole cost: an SFT step is one backward)."""
    total = stage.epochs * math.ceil(n_examples / stage.batch_size)
    if getattr(stage, "compute_match", "none") == "vaa" and total > 0:
        from hftlab.algorithms.curriculum import make_schedule
        from hftlab.algorithms.vaa import expected_backward

        vaa = stage.vaa
        total = round(total * expected_backward(vaa.rho, vaa.objective, make_schedule(vaa.curriculum, vaa.lam), total))
    return total


def side_stream(encoded: Sequence, batch_size: int, pad_id: int, seed: int, device: torch.device,
                rank: int = 0, world: int = 1) -> Callable[[], Batch]:
    """next() over endless shuffled batches of `encoded` (this rank's slices), moved to `device`."""
    from hftlab.training.grouped import group_stream

    stream = group_stream(list(encoded), batch_size, pad_id, seed + SIDE_SEED, rank, world)
    return lambda: {k: v.to(device) for k, v in next(stream).items()}


def kl_reference(module: torch.nn.Module) -> Callable[[Batch], torch.Tensor]:
    """The aligned model's logits: the same weights with the LoRA adapter disabled, else a frozen copy taken now."""
    if hasattr(module, "disable_adapter"):  # peft: the base under the adapter is the aligned model

        def with_adapter_off(batch: Batch) -> torch.Tensor:
            with module.disable_adapter():
                return module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

        return with_adapter_off
    frozen = copy.deepcopy(module).eval().requires_grad_(False)
    return lambda batch: frozen(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def build_step(stage: AlignConfig | FinetuneConfig, engine, *, side: Callable[[], Batch] | None = None,
               loss_fn: Callable = causal_lm_loss, seed: int = 0) -> Callable:
    """The step callable step(model, batch, engine) -> stats for `stage.method` (not VAA: see grouped.py)."""
    if stage.method == "sft":
        return partial(sft_step, loss_fn=loss_fn)
    if stage.method == "safegrad":
        from hftlab.algorithms.safegrad import SafeGradStep

        sg = stage.safegrad
        reference = kl_reference(engine.module) if sg.align_loss == "kl" else None
        return SafeGradStep(side, align_loss=sg.align_loss, reference=reference, mode=sg.mode, rho=sg.rho,
                            cadence=sg.cadence, loss_fn=loss_fn)
    if stage.method == "vaccine":
        from hftlab.algorithms.vaccine import VaccineStep

        return VaccineStep(rho=stage.vaccine.rho, loss_fn=loss_fn)
    if stage.method == "booster":
        from hftlab.algorithms.booster import BoosterStep

        return BoosterStep(side, lam=stage.booster.lam, alpha=stage.booster.alpha, loss_fn=loss_fn)
    if stage.method == "repnoise":
        from hftlab.algorithms.repnoise import RepNoiseStep

        rn = stage.repnoise
        return RepNoiseStep(side, alpha=rn.alpha, beta=rn.beta, ascent=rn.ascent, loss_fn=loss_fn, seed=seed)
    raise ValueError(f"method={stage.method!r} has no step here (VAA is built by training/grouped.py)")
