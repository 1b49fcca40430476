"""Config sections for evaluation (judge, HS/FA), VAA's stage 1 (groups) and tracking."""

from __future__ import annotations

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


@dataclass
class EvalConfig:
    n_harmful: int | None = None
    """Harmful test prompts for HS (null: all; the papers use the first 500 or 1000)."""
    n_task: int | None = None
    """Task test examples for FA (null: all)."""
    max_new_tokens: int = 24
    """Greedy generation length."""
    batch_size: int = 64
    """Prompts per generate call."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """Which judge decides harmfulness."""
    n_samples_logged: int = 40
    """Generations per stage kept in the samples table artifact."""

    def __post_init__(self) -> None:
        check(self.n_harmful is None or self.n_harmful > 0, "n_harmful", self.n_harmful, "must be > 0")
        check(self.n_task is None or self.n_task > 0, "n_task", self.n_task, "must be > 0")
        check(self.max_new_tokens > 0, "max_new_tokens", self.max_new_tokens, "must be > 0")
        check(self.batch_size > 0, "batch_size", self.batch_size, "must be > 0")


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

    def __post_init__(self) -> None:
        check(len(self.proxies) > 0, "proxies", self.proxies, "needs at least one proxy run")
        check(1 <= self.at_least <= len(self.proxies), "at_least", self.at_least,
              f"must be in [1, {len(self.proxies)}] (the number of proxies)")
        check(self.actors > 0, "actors", self.actors, "must be > 0")
        check(self.batch_size > 0, "batch_size", self.batch_size, "must be > 0")
        check(self.cpus_per_actor >= 0 and self.gpus_per_actor >= 0, "cpus_per_actor", self.cpus_per_actor, "must be >= 0")
        check(self.threads_per_actor > 0, "threads_per_actor", self.threads_per_actor, "must be > 0")


@dataclass
class TrackingConfig:
    enabled: bool = True
    """Log to MLflow."""
    experiment: str | None = None
    """MLflow experiment (null: the config's name)."""
    tracking_uri: str | None = None
    """Tracking URI (null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory)."""
