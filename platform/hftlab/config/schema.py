"""The config schema: the top-level Config; each section lives in its own module, re-exported here.

A field exists once, in one section; its dotted name (`finetune.poison_ratio`) is the CLI override, the sweep
key and the MLflow param name. Sections: data.py, model.py, methods.py (per-algorithm settings), run/stages.py
(align, finetune), evaluation.py (eval, judge, groups, tracking).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from hftlab.config.data import DataConfig, ToyWorldConfig
from hftlab.config.errors import check
from hftlab.config.evaluation import (
    JUDGE_KINDS,
    EvalConfig,
    JudgeConfig,
    TrackingConfig,
    TrainedJudgeConfig,
    VLLMConfig,
)
from hftlab.config.groups import GroupsConfig, ProxyConfig
from hftlab.config.methods import GROUPINGS, BoosterConfig, LisaConfig, RepNoiseConfig, SafeGradConfig, VAAConfig, VaccineConfig
from hftlab.config.model import LoraConfig, ModelConfig, TinyModelConfig
from hftlab.config.stages import TASKS, AlignConfig, FinetuneConfig

__all__ = ["GROUPINGS", "TASKS", "AlignConfig", "BoosterConfig", "Config",
           "DataConfig", "EvalConfig", "FinetuneConfig", "GroupsConfig", "JUDGE_KINDS", "JudgeConfig", "LisaConfig",
           "LoraConfig", "ModelConfig", "ProxyConfig", "RepNoiseConfig", "SafeGradConfig", "TinyModelConfig",
           "ToyWorldConfig", "TrackingConfig", "TrainedJudgeConfig", "VAAConfig", "VaccineConfig", "VLLMConfig"]


URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # s3://, gs://, hdfs://, file://


@dataclass
class Config:
    name: str = "hftlab"
    """Name of this experiment (the MLflow experiment unless tracking.experiment is set)."""
    label: str = ""
    """A short name for this arm in reports and run names (e.g. sft-compute-matched); empty: the methods."""
    seed: int = 0
    """Seed for data mixing, initialisation and batch order."""
    output_dir: str = "outputs"
    """Where stage outputs (models, generations) go, keyed by content hash."""
    cache_dir: str | None = None
    """Where built tiny base models are cached (null: $HFTLAB_CACHE or ~/.cache/hftlab)."""
    threads: int | None = None
    """torch CPU threads (null: torch's default)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Where alignment, harmful and test data come from."""
    base: ModelConfig = field(default_factory=ModelConfig)
    """The base (pre-trained, unaligned) model."""
    align: AlignConfig = field(default_factory=AlignConfig)
    """The alignment stage."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """The (harmful) fine-tuning stage."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation of base, aligned and fine-tuned models."""
    groups: GroupsConfig = field(default_factory=GroupsConfig)
    """VAA stage 1: vulnerability groups (`hftlab groups`)."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow tracking."""

    def __post_init__(self) -> None:
        check(bool(self.name.strip()), "name", self.name, "must not be empty")
        check(self.threads is None or self.threads > 0, "threads", self.threads, "must be > 0")
        for name in ("output_dir", "cache_dir"):  # stages are read and written as files (safetensors, HF dirs, flocks)
            value = getattr(self, name)
            check(value is None or not URI.match(value), name, value,
                  "is a URI; stages are read as files: mount the bucket or share on every node (s3fs, gcsfuse, NFS) "
                  "and give its path (docs/cluster.md)")
