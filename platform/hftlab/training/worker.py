"""One worker's training: set up (or resume), step through the global batches, report checkpoints; under Ray Train
(training/trainer.py: N workers, DDP or DeepSpeed) or in this process as the one worker of a world of one.

Every worker builds the same global batches from the same seed and trains on its slice of each
(training/batches.py: rows rank, rank + W, ...). The loss is the token sum of the slice divided by the
global batch's token count / W, so the rank average of gradients equals the single-process mean-token gradient:
1 worker and W workers follow the same trajectory up to float rounding. Probe gradients (VAA's eps, SafeGrad's
alignment gradient) are averaged over ranks by the engine, and VAA's sampler and coin share a seed, so all ranks
draw the same group and apply the same update.

What differs between Ray Train and this process is a `Session`: where a resumed checkpoint comes from, the device,
the model's wrapper (DDP) and where a reported checkpoint goes. `train_local` runs the same loop with a
`LocalSession`: what one Ray Train worker computes, without a worker group to start (tests compare N workers to it).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from hftlab.config.schema import AlignConfig, FinetuneConfig
from hftlab.data.template import encode
from hftlab.faults import CrashOnce
from hftlab.models import precision
from hftlab.models.stage_dir import mark_parent
from hftlab.training.batches import Pair, batches
from hftlab.training.checkpoint import Counted
from hftlab.training.methods import build_step, method_of, side_stream, step_budget


@dataclass(frozen=True)
class WorkerJob:
    """What every worker is handed, typed (Ray pickles it whole): the stage and its data, and the model as base.* says
    to load it."""

    stage: AlignConfig | FinetuneConfig
    parent: str
    """The parent model's directory (a LoRA parent comes merged, as in-process)."""
    pairs: list[Pair]
    groups: list[int | None] | None
    """A grouped method's group per pair (None: not grouped)."""
    side: list[Pair] | None
    """The pairs the method's record asks for besides the stage's own (None: none)."""
    seed: int
    template: str
    max_length: int
    threads: int = 1
    """torch threads per worker (its CPUs)."""
    dtype: str = "float32"
    """base.dtype (auto: fp32 weights, bf16 autocast where the hardware has bf16)."""
    trust_remote_code: bool = False
    use_gpu: bool = False
    crash: CrashOnce | None = None
    """Fault injection (tests): faults.CrashOnce."""


class LocalSession:
    """This process as the one worker of a world of one: no resume, the CPU, no wrapper; the latest reported
    checkpoint is copied into `out`."""

    rank, world = 0, 1

    def __init__(self, out: Path) -> None:
        self.out, self.metrics = out, {}

    def checkpoint_dir(self) -> str | None:
        return None

    def device(self) -> torch.device:
        return torch.device("cpu")

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def report(self, metrics: dict, directory: str | None) -> None:
        self.metrics = metrics
        if directory is not None:
            shutil.copytree(directory, self.out, dirs_exist_ok=True)


def token_sum_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of response-token cross-entropy on this slice / batch["norm"] (global tokens / world size)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="sum")
    return nll / batch["norm"]


def _setup(job: WorkerJob, session):
    """Load the parent (or the checkpoint's weights), wrap it, build the step and the batch sources."""
    from hftlab.training.engine import LocalEngine, Recipe

    stage, rank, world = job.stage, session.rank, session.world
    method = method_of(stage)
    ckpt_dir = session.checkpoint_dir()
    model, tokenizer = _load(job, ckpt_dir)
    model.to(session.device())  # this worker's GPU (use_gpu), else the CPU
    encoded = encode(tokenizer, job.pairs, job.template, job.max_length)
    # a grouped method: SFT's budget over the examples that belong to a group (grouped.vaa_setup)
    total = step_budget(stage, sum(g is not None for g in job.groups) if method.grouped else len(encoded))
    recipe = Recipe.of(stage, total)  # the schedule's position is the engine's steps_taken, saved and resumed
    if stage.zero_stage is None:
        model = session.prepare(model)  # DDP under Ray Train
        engine = LocalEngine(model, recipe)
    else:
        from hftlab.training.engine import DeepSpeedEngine

        bf16 = job.use_gpu and job.dtype == "bfloat16"  # DeepSpeed's bf16 mode: fp32 master weights
        engine = DeepSpeedEngine(model, recipe, zero_stage=stage.zero_stage, bf16=bf16)
        model = engine.model  # forward through DeepSpeed's engine; it averages gradients over ranks like DDP
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    side, side_enc = None, None
    if job.side:
        side_enc = encode(tokenizer, job.side, job.template, job.max_length)
        side = Counted(side_stream(side_enc, method.side_batch_size(stage), pad, job.seed, device, rank, world,
                                    paired=method.side_paired(stage), bucketed=stage.bucketed))
    if method.grouped:
        from hftlab.training.batches import group_stream
        from hftlab.training.grouped import vaa_setup

        members, step, total = vaa_setup(encoded, job.groups, stage.vaa, epochs=stage.epochs,
                                         batch_size=stage.batch_size, seed=job.seed,
                                         loss_fn=token_sum_loss, reduce_fn=_mean_over_ranks)
        streams = [group_stream(m, stage.batch_size, pad, job.seed + k, rank, world, stage.bucketed)
                   for k, m in enumerate(members)]
        readers = [Counted(lambda s=s: {k: v.to(device) for k, v in next(s).items()}) for s in streams]
    else:
        # e.g. SafeGrad's KL reference is the aligned parent: under LoRA the adapter switched off (also after a
        # resume); otherwise loaded apart, since after a resume the model is the checkpoint
        reference = _load(job, None)[0].to(device) if method.reference_apart(stage) else None
        step = build_step(stage, engine, side=side, loss_fn=token_sum_loss, seed=job.seed, total_steps=total,
                          pad_id=pad, side_rows=side_enc, reference=reference)
        readers = []
    state = {"step": 0}
    if ckpt_dir is not None:  # resume: optimizer, step state, and the streams read as far as they were
        state = torch.load(Path(ckpt_dir) / "train_state.pt", weights_only=True)
        engine.load(ckpt_dir)
        if hasattr(step, "load_state_dict"):
            step.load_state_dict(state["step_state"])
        for reader, n in zip(readers, state["reads"], strict=True):
            reader.skip(n)
        if side is not None:
            side.skip(state["side_reads"])
    return model, tokenizer, engine, step, encoded, readers, side, total, state["step"]


def _load(job: WorkerJob, ckpt_dir: str | None):
    """The parent as the whole model config says (dtype, trust_remote_code, the stage's LoRA), or the checkpoint's.

    Under LoRA the parent is loaded (a LoRA parent comes merged, as in-process) and gets fresh adapters from the
    seed every rank shares, or, resuming, the checkpoint's adapter, trainable; the base weights stay frozen.
    """
    from hftlab.models.loading import add_lora, load_model

    opts = {"dtype": precision.weights_for_training(job.dtype), "trust_remote_code": job.trust_remote_code}
    if not job.stage.lora.enabled:
        return load_model(ckpt_dir or job.parent, **opts)
    model, tokenizer = load_model(job.parent, **opts)
    if ckpt_dir is None:
        return add_lora(model, job.stage.lora), tokenizer
    from peft import PeftModel

    return PeftModel.from_pretrained(model, ckpt_dir, is_trainable=True), tokenizer


def run_worker(job: WorkerJob, session) -> None:
    """Set up (or resume), train with the configured step, report checkpoints through `session`."""
    torch.set_num_threads(job.threads)
    torch.manual_seed(job.seed)
    stage = job.stage
    grouped = method_of(stage).grouped
    model, tokenizer, engine, step, encoded, readers, side, total, done = _setup(job, session)
    resumed_at = done
    cast = precision.autocast_dtype(job.dtype)  # bf16 autocast under base.dtype=auto
    model.train()
    per_epoch = max(math.ceil(len(encoded) / stage.batch_size), 1)
    main = None
    last = float("nan")
    while done < total:
        if grouped:
            with precision.autocast(cast):
                stats = step(model, lambda g: readers[g](), engine)
        else:
            if main is None or done % per_epoch == 0:  # (re)open the epoch the step falls in, skip what was done
                epoch = done // per_epoch
                main = batches(encoded, stage.batch_size, tokenizer.pad_token_id, job.seed, epoch, session.rank,
                               session.world, stage.bucketed)
                for _ in range(done % per_epoch):
                    next(main)
            batch = {k: v.to(next(model.parameters()).device) for k, v in next(main).items()}
            with precision.autocast(cast):
                stats = step(model, batch, engine)
        done, last = done + 1, stats["loss"]
        if job.crash is not None:  # fault injection (faults.CrashOnce): a worker dies mid-run, once
            job.crash.check(done, first_attempt=resumed_at == 0)
        every = stage.checkpoint_every
        if done == total or (every and done % every == 0):
            _report(job, session, model, tokenizer, engine, step, readers, side, done, last)


def _report(job: WorkerJob, session, model, tokenizer, engine, step, readers, side, done, last) -> None:
    """Every rank reports the same metrics; rank 0 writes the weights and shared state, each rank its optimizer shard."""
    rank = session.rank
    metrics = {"steps": done, "last_loss": last, "world_size": session.world}
    sharded = job.stage.zero_stage is not None
    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0:
            inner = model.module if hasattr(model, "module") else model
            inner.save_pretrained(tmp, safe_serialization=True)  # under LoRA: the adapter alone
            tokenizer.save_pretrained(tmp)
            mark_parent(tmp, job.parent)  # a LoRA stage like models/loading.save_stage writes
            torch.save({"step": done, "step_state": step.state_dict() if hasattr(step, "state_dict") else None,
                        "reads": [r.reads for r in readers], "side_reads": side.reads if side is not None else 0},
                       Path(tmp) / "train_state.pt")
        engine.save(tmp, rank)
        session.report(metrics, tmp if (rank == 0 or sharded) else None)


def _mean_over_ranks(value: float) -> float:
    """Each rank holds its slice's share of the global mean loss: their mean is the global mean loss."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def strip_training_state(out: Path) -> None:
    """The stage's output is the model alone: the optimizer and the loop's state leave the last checkpoint."""
    for extra in [*out.glob("optimizer*.pt"), out / "train_state.pt"]:
        extra.unlink(missing_ok=True)


def train_local(stage: AlignConfig | FinetuneConfig, parent: str, pairs: list[Pair], out_dir: str | Path, *, seed: int,
                template: str, max_length: int, groups: list[int | None] | None = None, side: list[Pair] | None = None,
                threads: int = 1, dtype: str = "float32") -> dict:
    """What one Ray Train worker computes (train_distributed with workers=1), run in this process: the same loop,
    batches, step, loss and seed; the trained model lands in `out_dir`. Not for ZeRO (DeepSpeed needs its ranks)."""
    if stage.zero_stage is not None:
        raise ValueError("train_local runs without torch.distributed: ZeRO needs train_distributed")
    out = Path(out_dir)
    session = LocalSession(out)
    threads_before = torch.get_num_threads()
    try:
        run_worker(WorkerJob(stage, parent, list(pairs), groups, side, seed, template, max_length, threads=threads,
                             dtype=dtype), session)
    finally:
        torch.set_num_threads(threads_before)
    strip_training_state(out)
    return session.metrics
