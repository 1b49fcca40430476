"""From a stage's config to its algorithm step: the one place that maps `method` to a core in algorithms/.

Used by the in-process loop (training/loop.py) and by the Ray Train workers (training/trainer.py), so both run the
same step. VAA is built by training/grouped.py (it draws its own batches per group). Steps that need data besides
the stage's own batches (SafeGrad, Lisa: alignment pairs; Booster, RepNoise: harmful pairs) get it as `side`,
encoded pairs turned into an endless stream of this rank's slices.
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
    if stage.method in ("safegrad", "lisa"):
        return "alignment"
    if stage.method in ("booster", "repnoise"):
        return "harmful"
    return None


def side_paired(stage: AlignConfig | FinetuneConfig) -> bool:
    """The side pairs line up with the stage's own pairs (RepNoise `paired`): their stream follows the main order."""
    return stage.method == "repnoise" and stage.repnoise.paired


def side_batch_size(stage: AlignConfig | FinetuneConfig) -> int:
    """Side examples per step: SafeGrad's alignment batch, Booster's harmful batch, else the stage's batch size
    (RepNoise's harmful batch, and Lisa's alignment batch: git-disl/Lisa trainer.py:L63-L64 @ 68e3659)."""
    if stage.method == "safegrad":
        return stage.safegrad.batch_size
    if stage.method == "booster" and stage.booster.harmful_batch_size is not None:
        return stage.booster.harmful_batch_size
    return stage.batch_size


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
                rank: int = 0, world: int = 1, paired: bool = False, bucketed: bool = False) -> Callable[[], Batch]:
    """next() over endless shuffled batches of `encoded` (this rank's slices), moved to `device`. `paired`: the same
    shuffle as the stage's own batches (training/batches.py with `seed`), so row i of both is the same pair index;
    `bucketed`: rows of like length batched together (ignored when `paired`: the pairing is by row)."""
    from hftlab.training.grouped import group_stream

    stream = group_stream(list(encoded), batch_size, pad_id, seed if paired else seed + SIDE_SEED, rank, world,
                          bucketed and not paired)
    return lambda: {k: v.to(device) for k, v in next(stream).items()}


def kl_reference(module: torch.nn.Module) -> Callable[[Batch], torch.Tensor]:
    """The aligned model's logits: the same weights with the LoRA adapter disabled, else a frozen copy taken now."""
    if hasattr(module, "disable_adapter"):  # peft: the base under the adapter is the aligned model

        def with_adapter_off(batch: Batch) -> torch.Tensor:
            with module.disable_adapter():
                return module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

        return with_adapter_off
    return frozen_logits(copy.deepcopy(module))


def frozen_logits(model: torch.nn.Module) -> Callable[[Batch], torch.Tensor]:
    """`model`'s logits, with `model` frozen in eval mode (a reference that never trains)."""
    frozen = model.eval().requires_grad_(False)
    return lambda batch: frozen(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def safegrad_reference(stage: FinetuneConfig, engine, reference: torch.nn.Module | None,
                       side_rows: Sequence | None, pad_id: int) -> Callable[[Batch], torch.Tensor]:
    """SafeGrad's KL target: the aligned model's response log-probabilities, cached for the fixed alignment set.

    `reference`: the aligned model when the caller has it apart (a resumed Ray Train run: its weights are the parent,
    never the checkpoint); else the adapter-off weights under LoRA or a copy of the model as it is now.
    """
    from hftlab.algorithms.safegrad import CachedReference, response_logprobs
    from hftlab.training.batches import collate

    logits_fn = frozen_logits(reference) if reference is not None else kl_reference(engine.module)
    if stage.safegrad.cache_reference and side_rows:
        device = next(engine.module.parameters()).device
        bs = stage.safegrad.batch_size
        chunks = (collate(side_rows[i : i + bs], pad_id) for i in range(0, len(side_rows), bs))
        return CachedReference(logits_fn, ({k: v.to(device) for k, v in b.items()} for b in chunks))
    return lambda batch: response_logprobs(logits_fn(batch), batch["labels"])


def build_step(stage: AlignConfig | FinetuneConfig, engine, *, side: Callable[[], Batch] | None = None,
               loss_fn: Callable = causal_lm_loss, seed: int = 0, total_steps: int = 0, pad_id: int = 0,
               side_rows: Sequence | None = None, reference: torch.nn.Module | None = None) -> Callable:
    """The step callable step(model, batch, engine) -> stats for `stage.method` (not VAA: see grouped.py).

    `side_rows`: the encoded side pairs (SafeGrad caches its reference over them); `reference`: SafeGrad's aligned
    model when it is not the model being trained (see safegrad_reference); `total_steps`: the stage's step budget.
    """
    if stage.method == "sft":
        return partial(sft_step, loss_fn=loss_fn)
    if stage.method == "safegrad":
        from hftlab.algorithms.safegrad import SafeGradStep

        sg = stage.safegrad
        ref = safegrad_reference(stage, engine, reference, side_rows, pad_id) if sg.align_loss == "kl" else None
        return SafeGradStep(side, align_loss=sg.align_loss, reference=ref, mode=sg.mode, rho=sg.rho,
                            cadence=sg.cadence, loss_fn=loss_fn)
    if stage.method == "lisa":
        from hftlab.algorithms.lisa import LisaStep

        li = stage.lisa
        return LisaStep(side, engine.params, rho=li.rho, alignment_steps=li.alignment_steps,
                        finetune_steps=li.finetune_steps, proximal_from=li.proximal_after * total_steps, loss_fn=loss_fn)
    if stage.method == "vaccine":
        from hftlab.algorithms.vaccine import VaccineStep

        suffix = {"attention": "Attention", "decoder": "DecoderLayer"}[stage.vaccine.layers]
        return VaccineStep(rho=stage.vaccine.rho, module_suffix=suffix, loss_fn=loss_fn)
    if stage.method == "booster":
        from hftlab.algorithms.booster import BoosterStep

        return BoosterStep(side, lam=stage.booster.lam, alpha=stage.booster.alpha, loss_fn=loss_fn)
    if stage.method == "repnoise":
        from hftlab.algorithms.repnoise import RepNoiseStep

        rn = stage.repnoise
        return RepNoiseStep(side, alpha=rn.alpha, beta=rn.beta, mask=rn.mask, pad_id=pad_id, loss_fn=loss_fn, seed=seed)
    raise ValueError(f"method={stage.method!r} has no step here (VAA is built by training/grouped.py)")
