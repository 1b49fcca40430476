"""The built-in methods' records (training/method.py): each method's name, cost, side data and step, declared once.
The registry (training/methods.py) starts with them.

Passes per step count forward+backward passes relative to an SFT step, as each algorithm file's docstring does.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from hftlab.config.errors import check
from hftlab.training.method import BASELINE, Batch, Method, Stage, StepInputs, build_sft

if TYPE_CHECKING:  # loaded by the config's validation, which must not load torch
    import torch


BUILTIN: list[Method] = []


def _one(stage: Stage, total_steps: int) -> float:
    return 1.0


BUILTIN.append(Method(BASELINE, ("align", "finetune"), passes=_one, build=build_sft))


# --- VAA (algorithms/vaa.py): Group DRO over vulnerability groups, its own loop in training/grouped.py -------------
def _vaa_passes(stage: Stage, total_steps: int) -> float:
    """Backward passes per step of VAA with `stage.vaa` (also what compute-matched SFT spends per step)."""
    from hftlab.algorithms.curriculum import make_schedule
    from hftlab.algorithms.vaa import expected_backward

    v = stage.vaa
    return expected_backward(v.rho, v.objective, make_schedule(v.curriculum, v.lam), total_steps)


BUILTIN.append(Method("vaa", ("align",), passes=_vaa_passes, grouped=True,
                groups_stage=lambda stage: stage.vaa.group_file is None))


def groups_parent(align: Stage) -> Stage:
    """The alignment stage VAA's stage 1 (the groups' proxy fine-tuning) starts from: the SFT arm's own, with the
    grouped method's settings reset, so every VAA variant of a seed shares one stage 1 (pipeline.vaa_groups)."""
    from dataclasses import replace

    from hftlab.config.methods import VAAConfig

    return replace(align, method=BASELINE, vaa=VAAConfig())


# --- Vaccine (algorithms/vaccine.py): perturbation-aware alignment, two passes ----------------------------------
def _build_vaccine(stage: Stage, engine, inputs: StepInputs) -> Callable:
    from hftlab.algorithms.vaccine import VaccineStep

    suffix = {"attention": "Attention", "decoder": "DecoderLayer"}[stage.vaccine.layers]
    return VaccineStep(rho=stage.vaccine.rho, module_suffix=suffix, loss_fn=inputs.loss_fn)


BUILTIN.append(Method("vaccine", ("align",), passes=lambda stage, total: 2.0, build=_build_vaccine))


# --- Booster (algorithms/booster.py): attenuating the harmful perturbation, three passes over harmful side data ---
def _build_booster(stage: Stage, engine, inputs: StepInputs) -> Callable:
    from hftlab.algorithms.booster import BoosterStep

    return BoosterStep(inputs.side, lam=stage.booster.lam, alpha=stage.booster.alpha, loss_fn=inputs.loss_fn)


BUILTIN.append(Method("booster", ("align",), passes=lambda stage, total: 3.0, build=_build_booster, side="harmful",
                side_batch_size=lambda s: s.batch_size if s.booster.harmful_batch_size is None else s.booster.harmful_batch_size))


# --- RepNoise (algorithms/repnoise.py): harmful representations pushed to noise, harmful side data ---------------
def _build_repnoise(stage: Stage, engine, inputs: StepInputs) -> Callable:
    from hftlab.algorithms.repnoise import RepNoiseStep

    rn = stage.repnoise
    return RepNoiseStep(inputs.side, alpha=rn.alpha, beta=rn.beta, mask=rn.mask, pad_id=inputs.pad_id,
                        loss_fn=inputs.loss_fn, seed=inputs.seed)


def _check_repnoise(stage: Stage) -> None:
    check(stage.batching == "random" or not stage.repnoise.paired, "batching", stage.batching,
          "bucketed batches would break RepNoise's pairing (repnoise.paired): use random")


BUILTIN.append(Method("repnoise", ("align",), passes=lambda stage, total: 2.0, build=_build_repnoise, side="harmful",
                side_paired=lambda s: s.repnoise.paired, check=_check_repnoise))


# --- SafeGrad (algorithms/safegrad.py): task gradient projected off the alignment gradient, every `cadence` steps --
def frozen_logits(model: torch.nn.Module) -> Callable[[Batch], torch.Tensor]:
    """`model`'s logits, with `model` frozen in eval mode (a reference that never trains)."""
    frozen = model.eval().requires_grad_(False)
    return lambda batch: frozen(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def kl_reference(module: torch.nn.Module) -> Callable[[Batch], torch.Tensor]:
    """The aligned model's logits: the same weights with the LoRA adapter disabled, else a frozen copy taken now."""
    if hasattr(module, "disable_adapter"):  # peft: the base under the adapter is the aligned model

        def with_adapter_off(batch: Batch) -> torch.Tensor:
            with module.disable_adapter():
                return module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

        return with_adapter_off
    return frozen_logits(copy.deepcopy(module))


def safegrad_reference(stage: Stage, engine, reference: torch.nn.Module | None,
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


def _build_safegrad(stage: Stage, engine, inputs: StepInputs) -> Callable:
    from hftlab.algorithms.safegrad import SafeGradStep

    sg = stage.safegrad
    ref = safegrad_reference(stage, engine, inputs.reference, inputs.side_rows, inputs.pad_id) \
        if sg.align_loss == "kl" else None
    return SafeGradStep(inputs.side, align_loss=sg.align_loss, reference=ref, mode=sg.mode, rho=sg.rho,
                        cadence=sg.cadence, loss_fn=inputs.loss_fn)


BUILTIN.append(Method("safegrad", ("finetune",), passes=lambda s, total: 1.0 + 1.0 / max(s.safegrad.cadence, 1),
                build=_build_safegrad, side="alignment", side_batch_size=lambda s: s.safegrad.batch_size,
                side_limit=lambda s: ("finetune.safegrad.n_alignment", s.safegrad.n_alignment),
                reference_apart=lambda s: s.safegrad.align_loss == "kl" and not s.lora.enabled))


# --- Lisa (algorithms/lisa.py): alternating alignment and fine-tuning phases with a proximal term -----------------
def _build_lisa(stage: Stage, engine, inputs: StepInputs) -> Callable:
    from hftlab.algorithms.lisa import LisaStep

    li = stage.lisa
    return LisaStep(inputs.side, engine.params, rho=li.rho, alignment_steps=li.alignment_steps,
                    finetune_steps=li.finetune_steps, proximal_from=li.proximal_after * inputs.total_steps,
                    loss_fn=inputs.loss_fn)


# Lisa's alignment batch is the stage's batch size (git-disl/Lisa trainer.py:L63-L64 @ 68e3659)
BUILTIN.append(Method("lisa", ("finetune",), passes=_one, build=_build_lisa, side="alignment",
                side_limit=lambda s: ("finetune.lisa.n_alignment", s.lisa.n_alignment)))
