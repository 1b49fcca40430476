"""Config sections of the two training stages: alignment and (harmful) fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from hftlab.config.errors import check
from hftlab.config.methods import BoosterConfig, LisaConfig, RepNoiseConfig, SafeGradConfig, VAAConfig, VaccineConfig
from hftlab.config.model import LoraConfig

TASKS = ("sst2", "agnews", "gsm8k", "alpaca")
LR_SCHEDULERS = ("constant", "linear", "cosine")


@dataclass
class StageTraining:
    """The training recipe and the Ray Train / DeepSpeed placement both stages share (same dotted keys under align.
    and finetune.); each stage subclasses it, adds its own fields and may change a default."""

    epochs: int = 3
    """Passes over the stage's training mix."""
    lr: float = 5e-4
    """AdamW learning rate."""
    batch_size: int = 32
    """Examples per optimizer step."""
    weight_decay: float = 0.1
    """AdamW weight decay, not on biases and norm weights (the references' --weight_decay 0.1, e.g. git-disl/Vaccine
    script/alignment/Vaccine.sh:L32; HF Trainer's decay/no-decay split)."""
    max_grad_norm: float | None = 1.0
    """Clip the update gradient to this global L2 norm before each optimizer step (the HF Trainer default 1.0, which
    every reference trains under; null: no clipping)."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule over the stage's steps: constant, linear (to 0) or cosine (to 0), as HF's schedulers
    (Booster, VAA and Lisa fine-tuning: constant; Vaccine and Lisa's SFT alignment: cosine)."""
    warmup_ratio: float = 0.0
    """Share of the steps with a linear warmup from 0 (Vaccine.sh:L33: 0.1 with cosine). Unlike HF's "constant",
    which ignores it, constant here warms up too."""
    batching: Literal["random", "bucketed"] = "random"
    """How an epoch's rows form batches: random (a shuffle cut into batches, each padded to its longest row) or
    bucketed (rows of like length together, the batches in random order: HF's group_by_length; on real data a third
    to half fewer tokens per step, jobs/bench/training.py). Each side stream (SafeGrad's, Booster's, VAA's groups)
    batches the same way."""
    workers: int = 1
    """1: train in this process; N > 1: a Ray Train TorchTrainer with N DDP workers (N reproduce 1: training/worker.py)."""
    zero_stage: int | None = None
    """With workers > 1: null = plain DDP; 0, 1, 2 = DeepSpeed ZeRO stage (every method: see training/engine.py)."""
    use_gpu: bool = False
    """Train on GPUs: with workers > 1 one GPU per Ray Train worker and nccl (base.dtype=bfloat16 with zero_stage:
    DeepSpeed's bf16 mode); with workers = 1 this process's GPU. Without enough GPUs the run stops before any work."""
    checkpoint_every: int = 0
    """With workers > 1: report a resumable checkpoint every N optimizer steps (0: only at the end)."""
    max_failures: int = 0
    """With workers > 1: restarts after a worker failure, each resuming from the latest checkpoint."""

    @property
    def bucketed(self) -> bool:
        """Batches of rows of like length (training/batches.epoch_order)."""
        return self.batching == "bucketed"

    def check_method(self, kind: str) -> None:
        """The method is registered for this stage (training/methods.py: the record is asked, not a list of names)."""
        from hftlab.training.methods import names

        check(self.method in names(kind), "method", self.method, f"must be one of {list(names(kind))}")

    def check_method_settings(self) -> None:
        """What only this stage's method needs of its config (its record's `check`)."""
        from hftlab.training.methods import method_of

        method_of(self).check(self)

    def check_training(self) -> None:
        check(self.batching in ("random", "bucketed"), "batching", self.batching, "must be random or bucketed")
        check(self.workers >= 1, "workers", self.workers, "must be >= 1")
        check(self.zero_stage in (None, 0, 1, 2), "zero_stage", self.zero_stage, "must be null (DDP), 0, 1 or 2")
        check(self.max_failures >= 0, "max_failures", self.max_failures, "must be >= 0")
        check(self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every,
              "must be >= 0 (0: only at the end)")
        check(self.epochs >= 0, "epochs", self.epochs, "must be >= 0")
        check(self.lr > 0, "lr", self.lr, "must be > 0")
        check(self.batch_size > 0, "batch_size", self.batch_size, "must be > 0")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        check(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", self.max_grad_norm,
              "must be > 0 (null: no clipping)")
        check(self.lr_scheduler in LR_SCHEDULERS, "lr_scheduler", self.lr_scheduler,
              f"must be one of {list(LR_SCHEDULERS)}")
        check(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", self.warmup_ratio, "must be in [0, 1)")


@dataclass
class AlignConfig(StageTraining):
    method: str = "sft"
    """Alignment method: sft, vaa, vaccine, booster, repnoise, or any method registered for alignment
    (training/methods.py)."""
    compute_match: Literal["none", "vaa"] = "none"
    """With method=sft: none = epochs x batches steps; vaa = compute-matched SFT, as many steps as VAA with
    align.vaa would spend backward passes (1.5x under the default curriculum; the control for VAA's extra compute)."""
    n_alignment: int | None = None
    """Safe pairs of the alignment source used (null: all; 0: none, e.g. only data.refusals' distilled refusals)."""
    n_benign: int = 0
    """Benign toy-task examples mixed into alignment so the tiny model keeps its skills (toy world only)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA for the alignment stage."""
    vaa: VAAConfig = field(default_factory=VAAConfig)
    """VAA settings (used when method=vaa)."""
    vaccine: VaccineConfig = field(default_factory=VaccineConfig)
    """Vaccine settings (used when method=vaccine)."""
    booster: BoosterConfig = field(default_factory=BoosterConfig)
    """Booster settings (used when method=booster; trains on the harmful pairs too)."""
    repnoise: RepNoiseConfig = field(default_factory=RepNoiseConfig)
    """RepNoise settings (used when method=repnoise; trains on the harmful pairs too)."""

    def __post_init__(self) -> None:
        self.check_method("align")
        self.check_training()
        check(self.compute_match in ("none", "vaa"), "compute_match", self.compute_match, "must be none or vaa")
        check(self.compute_match == "none" or self.method == "sft", "compute_match", self.compute_match,
              f"matches SFT's compute to VAA's; method={self.method} must be sft")
        check(self.n_alignment is None or self.n_alignment >= 0, "n_alignment", self.n_alignment, "must be >= 0")
        check(self.n_benign >= 0, "n_benign", self.n_benign, "must be >= 0")
        self.check_method_settings()


@dataclass
class FinetuneConfig(StageTraining):
    method: str = "sft"
    """Fine-tuning method (the user's fine-tuning as a service would run it): sft, safegrad, lisa, or any method
    registered for fine-tuning (training/methods.py)."""
    task: str = "sst2"
    """User task: sst2, agnews, gsm8k or alpaca (in the toy world: their analogues)."""
    n: int = 1000
    """Fine-tuning samples in total (task + poison)."""
    poison_ratio: float = 0.1
    """Share p of the n samples that are harmful pairs."""
    lr: float = 1e-4
    """AdamW learning rate (the HFT strength knob; see docs/toy-world.md)."""
    train_source: str | None = None
    """Task training data: HF `name[:split]` or a local path (null: the task's default)."""
    test_source: str | None = None
    """Task test data for Fine-tune Accuracy (null: the task's default)."""
    test_share: float = 0.25
    """When train_source and test_source name the same data (e.g. the local AlpacaEval file), its rows are split:
    this share, drawn by data.split.seed, is the test set and never trains."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA for the fine-tuning stage."""
    safegrad: SafeGradConfig = field(default_factory=SafeGradConfig)
    """SafeGrad settings (used when method=safegrad)."""
    lisa: LisaConfig = field(default_factory=LisaConfig)
    """Lisa settings (used when method=lisa; trains on the alignment pairs too)."""

    def __post_init__(self) -> None:
        self.check_method("finetune")
        check(self.task in TASKS, "task", self.task, f"must be one of {list(TASKS)}")
        check(self.n > 0, "n", self.n, "must be > 0")
        check(0.0 <= self.poison_ratio <= 1.0, "poison_ratio", self.poison_ratio, "must be in [0, 1]")
        check(0.0 < self.test_share < 1.0, "test_share", self.test_share, "must be in (0, 1)")
        self.check_training()
        self.check_method_settings()
