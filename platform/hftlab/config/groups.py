"""Config section of VAA's stage 1 (`hftlab groups`): the proxy runs and how their matrix becomes groups."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from hftlab.config.errors import check
from hftlab.config.evaluation import check_backend, resolve_backend
from hftlab.config.stages import TASKS


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
    batching: Literal["random", "bucketed"] = "random"
    """random or bucketed batches, as align.batching (training/batches.epoch_order)."""

    @property
    def bucketed(self) -> bool:
        """Batches of rows of like length (training/batches.epoch_order)."""
        return self.batching == "bucketed"

    def __post_init__(self) -> None:
        check(self.batching in ("random", "bucketed"), "batching", self.batching, "must be random or bucketed")
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
    method: Literal["forgot_num", "loss"] = "forgot_num"
    """What makes an example vulnerable. `forgot_num` (the paper): its answer is judged harmful at some proxy
    checkpoint where the aligned model's was not, so every (checkpoint, example) is generated and judged. `loss`: its
    safe response's loss rises the most over the proxy checkpoints (the top `loss_share`); one forward pass per row, no
    generation and no judge (`rule` and `at_least` do not apply)."""
    loss_share: float = 0.5
    """For method=loss: the share of alignment examples called vulnerable, those with the largest loss rise (ForgotNum
    marked 52% of the real model's examples: docs/real-models.md)."""
    loss_score: bool = True
    """Also compute the continuous score: the rise of the safe response's loss across checkpoints (method=loss needs
    it)."""
    backend: str = "hf"
    """Generation in the matrix actors: `hf`, `vllm` (an engine per actor, moved checkpoint to checkpoint by
    reloading its weights; settings in eval.vllm) or `auto` (config/evaluation.resolve_backend)."""

    @property
    def generation_backend(self) -> str:
        """`backend` with auto resolved on this machine."""
        return resolve_backend(self.backend)

    def __post_init__(self) -> None:
        check(len(self.proxies) > 0, "proxies", self.proxies, "needs at least one proxy run")
        check(1 <= self.at_least <= len(self.proxies), "at_least", self.at_least,
              f"must be in [1, {len(self.proxies)}] (the number of proxies)")
        check(self.actors > 0, "actors", self.actors, "must be > 0")
        check(self.batch_size > 0, "batch_size", self.batch_size, "must be > 0")
        check(self.cpus_per_actor >= 0 and self.gpus_per_actor >= 0, "cpus_per_actor", self.cpus_per_actor, "must be >= 0")
        check(self.threads_per_actor > 0, "threads_per_actor", self.threads_per_actor, "must be > 0")
        check(0.0 < self.loss_share < 1.0, "loss_share", self.loss_share, "must be in (0, 1)")
        check(self.method != "loss" or self.loss_score, "loss_score", self.loss_score,
              "must be true with groups.method=loss (the grouping is that score)")
        check_backend(self.backend)
