"""Config sections for the base model: name or path, dtype, the tiny toy model, LoRA."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from hftlab.config.errors import check


@dataclass
class TinyModelConfig:
    hidden_size: int = 192
    """Width of the tiny Llama."""
    num_layers: int = 3
    """Decoder layers."""
    num_heads: int = 4
    """Attention heads (hidden_size must divide by it)."""
    intermediate_size: int = 512
    """MLP width."""
    pretrain_epochs: int = 3
    """Epochs of pre-training on benign tasks + harmful compliances (makes a capable, unaligned base)."""
    seed: int | None = None
    """Seed of the base model's initialisation and pre-training order (null: data.toy.seed); several values give
    several bases of the same world (the comparison's base-model seeds)."""
    pretrain_lr: float = 2e-3
    """Pre-training learning rate."""
    batch_size: int = 32
    """Pre-training batch size."""

    def __post_init__(self) -> None:
        check(self.seed is None or self.seed >= 0, "seed", self.seed, "must be >= 0")
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "pretrain_epochs", "batch_size"):
            check(getattr(self, name) > 0, name, getattr(self, name), "must be > 0")
        check(self.hidden_size % self.num_heads == 0, "num_heads", self.num_heads,
              f"must divide hidden_size={self.hidden_size}")
        check(self.pretrain_lr > 0, "pretrain_lr", self.pretrain_lr, "must be > 0")


@dataclass
class ModelConfig:
    name_or_path: str = "tiny"
    """`tiny`: build (or reuse from cache) the toy-world Llama; otherwise an HF model name or path."""
    trust_remote_code: bool = False
    """Allow a model repo's own Python code; off unless you trust the repo."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """Weights dtype when loading. `auto`: bf16 where the hardware has it (a CPU with AVX512-BF16 or AMX, or a GPU),
    else float32, decided at run time: training keeps float32 weights and runs under bf16 autocast, evaluation and
    vLLM load bf16 weights (models/precision.py). Training under `auto` and float32 differ in the last bits, so the
    resolved form is in the training stages' keys."""
    max_length: int = 256
    """Longest training sequence in tokens (prompt + response); longer ones are cut."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass instead of keeping them all (training stages and proxy
    runs): a real model's peak memory falls by most of its activations for about a third more compute. The gradients
    are the same, so it is in no stage's cache key (like `threads`)."""
    recompute_every_n_layers: int = 1
    """With gradient_checkpointing: recompute one decoder layer in n, the others keep their activations (1: every
    layer; 2: about half the activations' memory saved for a sixth more compute instead of a third). Not in any key."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Architecture and pre-training of the tiny model (used when name_or_path=tiny)."""

    def __post_init__(self) -> None:
        check(self.max_length > 8, "max_length", self.max_length, "must be > 8")
        check(self.recompute_every_n_layers >= 1, "recompute_every_n_layers", self.recompute_every_n_layers, "must be >= 1")
        check(self.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype", self.dtype,
              "must be one of auto, float32, bfloat16, float16")


ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj")


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train a LoRA adapter (peft) instead of all weights."""
    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.1
    """Dropout on the LoRA branch (git-disl/Vaccine train.py:L343-L358 and ChanLiang/VAA lm_model.py:L114-L150: 0.1)."""
    target_modules: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS))
    """Module names that get adapters (default: all seven projections of a Llama/Qwen2 block, as Vaccine's and VAA's
    LoRA; Booster adapts q_proj, k_proj, v_proj)."""

    def __post_init__(self) -> None:
        check(self.r > 0, "r", self.r, "must be > 0")
        check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")
        check(len(self.target_modules) > 0, "target_modules", self.target_modules, "must not be empty")
