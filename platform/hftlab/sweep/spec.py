"""Sweep files (configs/sweeps/*.yaml): their schema, loading and validation, before any trial runs.

A sweep file names a base config, fixed overrides and a search space over dotted config keys; each
trial's config is `load_config(base, overrides + the trial's dotlist)`: the same override language as
the CLI, so a space key is exactly a CLI key and an MLflow param name. Validation applies every grid
point (and both ends of every range) to the base config, so an unknown key or a bad value fails as
`space.<key>=<value>: ...` before Ray starts. `sweep/runner.py` runs what this module has checked.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hftlab.config.errors import check
from hftlab.config.loader import ConfigError, apply_overrides, build, load_config, parse_override, read_yaml
from hftlab.config.schema import URI
from hftlab.metrics import STAGE_METRICS
from hftlab.sweep.attack_spec import AttackConfig
from hftlab.sweep.space import KINDS, axes, check_space, points
from hftlab.tracking import client as tracking
from hftlab.training.methods import method_of

EARLY_METRICS = tuple(m for m in STAGE_METRICS if not m.startswith("finetuned."))
CONSTRAINT = re.compile(r"^\s*([\w.]+)\s*(>=|<=)\s*(-?[\d.]+(?:[eE][-+]?\d+)?)\s*$")
TRIAL_RESOURCES = "resources.custom"  # in the space: a trial's own Ray custom resources (where it runs), not a config key
RESERVED = ("CPU", "GPU", "memory", "object_store_memory")


@dataclass
class SchedulerConfig:
    kind: Literal["none", "asha"] = "none"
    """none: every trial runs to the end; asha: ASHA stops trials that are behind on `metric` early."""
    metric: str = "aligned.hs"
    """The intermediate metric ASHA compares (reported after alignment, before harmful fine-tuning)."""
    mode: Literal["min", "max"] = "min"
    """Whether lower or higher `metric` is better."""
    grace_period: int = 1
    """Reports every trial makes before it can be stopped (1: the aligned model's evaluation)."""
    reduction_factor: int = 2
    """ASHA's halving rate: about 1/reduction_factor of the trials go on at each rung."""

    def __post_init__(self) -> None:
        check(self.metric in EARLY_METRICS, "metric", self.metric,
              f"must be reported before the last stage, one of {list(EARLY_METRICS)}")
        check(self.grace_period >= 1, "grace_period", self.grace_period, "must be >= 1")
        check(self.reduction_factor >= 2, "reduction_factor", self.reduction_factor, "must be >= 2")


@dataclass
class ResourcesConfig:
    cpu: float = 1.0
    """CPUs per trial (also the trial's torch threads unless `threads` is set). A trial that starts Ray work
    itself (VAA's groups stage on Ray Data, `workers > 1` on Ray Train) needs CPUs left outside the trials."""
    gpu: float = 0.0
    """GPUs per trial."""
    custom: dict[str, float] = field(default_factory=dict)
    """Ray custom resources per trial, e.g. {worker1: 1}: a trial then runs only on a node started with them
    (`ray start --resources '{"worker1": 1}'`; infra/local/ray-cluster.sh gives worker n `worker<n>: 1`).
    To put different trials on different nodes, give a trial its own `resources.custom` in the space, as a key
    of a mapping value next to the config keys it sets (it places the trial, it is not a config override):
        space: {arm: {grid: [{finetune.poison_ratio: 0.0, resources.custom: {worker1: 1}},
                             {finetune.poison_ratio: 0.2, resources.custom: {worker2: 1}}]}}
    A trial's own value replaces this one; `resources.custom: {grid: [{worker1: 1}, ...]}` is an axis of its own."""

    def __post_init__(self) -> None:
        check(self.cpu > 0, "cpu", self.cpu, "must be > 0")
        check(self.gpu >= 0, "gpu", self.gpu, "must be >= 0")
        check_custom("custom", self.custom)


def check_custom(where: str, value: Any) -> None:
    """Custom resources are a mapping of names (not Ray's built-in CPU/GPU/memory) to amounts > 0."""
    ok = isinstance(value, dict) and all(
        isinstance(k, str) and k and k not in RESERVED and isinstance(v, int | float) and not isinstance(v, bool) and v > 0
        for k, v in value.items())
    check(ok, where, value, f"must map custom resource names (not {list(RESERVED)}) to amounts > 0")


@dataclass
class SweepConfig:
    base: str = ""
    """The base config, relative to the sweep file (or absolute)."""
    name: str = ""
    """The sweep's name: the Tune experiment directory and the MLflow parent run (empty: the file's stem)."""
    experiment: str | None = None
    """MLflow experiment of the parent and every trial (null: the sweep's name)."""
    overrides: list[str] = field(default_factory=list)
    """Dotted overrides applied to every trial, before the trial's own values."""
    space: dict[str, Any] = field(default_factory=dict)
    """dotted.key: {grid|choice: [values]} or {uniform|loguniform: [low, high]}. A value that is a mapping
    of dotted keys sets them together (e.g. a `method` axis of align.method + finetune.method pairs)."""
    metric: str = "finetuned.hs"
    """The metric that picks the best trial (the one registered in the Model Registry)."""
    mode: Literal["min", "max"] = "min"
    """Whether lower or higher `metric` is better."""
    constraints: list[str] = field(default_factory=list)
    """Only trials meeting all of these can be the best, e.g. `finetuned.fa>=80` (minimise HS subject to FA)."""
    num_samples: int = 1
    """Samples of the space (each grid point is run num_samples times, each range drawn anew)."""
    max_concurrent_trials: int = 1
    """Trials running at once."""
    max_failures: int = 0
    """Retries of a failed trial (its finished stages are reused)."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """An optional trial scheduler (ASHA) on an intermediate metric."""
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    """Resources per trial."""
    storage_path: str = "outputs/tune"
    """Where Tune keeps the experiment (relative to the working directory)."""
    register: str | None = ""
    """Model Registry name for the best trial's fine-tuned model (empty: hftlab-<name>; null: don't register)."""
    report: bool = True
    """Write and log the paper-style report (`hftlab report`) when the sweep ends."""
    attack: AttackConfig = field(default_factory=AttackConfig)
    """An attacker who tunes (sweep/attack_spec.py): with an `attack.space`, each trial of `space` is a defense whose
    aligned model is attacked by `attack.budget` inner trials, scored by the worst HS under the utility guard."""
    uses_ray: bool = False
    """Set by load_sweep (not in files): some trial starts Ray work of its own (VAA's groups stage, Ray Train)."""

    def __post_init__(self) -> None:
        check(bool(self.base), "base", self.base, "a sweep needs a base config")
        check(self.metric in STAGE_METRICS, "metric", self.metric, f"must be one of {list(STAGE_METRICS)}")
        check(self.num_samples >= 1, "num_samples", self.num_samples, "must be >= 1")
        check(not URI.match(self.storage_path), "storage_path", self.storage_path,
              "is a URI; the sweep's state and stages are files: mount the bucket or share on every node (s3fs, "
              "gcsfuse, NFS) and give its path (docs/cluster.md)")
        check(self.max_concurrent_trials >= 1, "max_concurrent_trials", self.max_concurrent_trials, "must be >= 1")
        check(self.max_failures >= -1, "max_failures", self.max_failures, "must be >= -1 (-1: retry forever)")
        for item in self.constraints:
            m = CONSTRAINT.match(item)
            check(m is not None and m.group(1) in STAGE_METRICS, "constraints", item,
                  f"must look like <metric> >= <number> or <=, with a metric in {list(STAGE_METRICS)}")
        check_space(self.space)
        if self.attack.enabled:
            check(self.scheduler.kind == "none", "scheduler.kind", self.scheduler.kind,
                  "a nested attack sweep runs every defense's attacks to the end")
        for key, dist in self.space.items():
            kind, values = next(iter(dist.items()))
            if key == TRIAL_RESOURCES:
                check(kind in ("grid", "choice"), f"space.{key}", dist, "needs grid or choice: [{name: amount}, ...]")
            for value in values if kind in ("grid", "choice") else []:
                if key == TRIAL_RESOURCES:
                    check_custom(f"space.{key}", value)
                elif isinstance(value, dict) and TRIAL_RESOURCES in value:
                    check_custom(f"space.{key}.{TRIAL_RESOURCES}", value[TRIAL_RESOURCES])


def to_overrides(key: str, value: Any) -> list[str]:
    """One trial value as dotlist items; a mapping sets several dotted keys together (resources.custom: none)."""
    if key == TRIAL_RESOURCES:
        return []
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in to_overrides(str(k), v)]
    if hasattr(value, "item"):  # numpy scalars from Tune's samplers
        value = value.item()
    text = value if isinstance(value, str) and parse_override(f"x={value}")[1] == value else json.dumps(value)
    return [f"{key}={text}"]


def trial_dotlist(point: dict[str, Any]) -> list[str]:
    return [item for key in sorted(point) for item in to_overrides(key, point[key])]


def swept_keys(spec: SweepConfig) -> list[str]:
    """The config keys the space sets (a mapping value's keys in place of its axis name)."""
    keys: set[str] = set()
    for key, dist in spec.space.items():
        values = next(iter(dist.values()))
        bundles = [v for v in values if isinstance(v, dict)]
        if key != TRIAL_RESOURCES:  # its values are resource maps, not config keys
            keys |= {str(k) for b in bundles for k in b} if bundles else {key}
    return sorted(keys - {TRIAL_RESOURCES})


def custom_resources(spec: SweepConfig) -> set[str]:
    """Every custom resource name some trial asks for (to warn when no node of the cluster has it)."""
    names = set(spec.resources.custom)
    for key, dist in spec.space.items():
        for value in next(iter(dist.values())):
            if key == TRIAL_RESOURCES or isinstance(value, dict) and isinstance(value.get(TRIAL_RESOURCES), dict):
                names |= set(value if key == TRIAL_RESOURCES else value[TRIAL_RESOURCES])
    return names


def trial_resources(spec: SweepConfig, point: dict[str, Any]) -> dict[str, float]:
    """One trial's Ray resources: the sweep's CPUs and GPUs, and its custom ones (the trial's own, else the sweep's)."""
    custom = spec.resources.custom
    for key, value in point.items():
        if key == TRIAL_RESOURCES:
            custom = value
        elif isinstance(value, dict) and TRIAL_RESOURCES in value:
            custom = value[TRIAL_RESOURCES]
    return {"CPU": spec.resources.cpu, "GPU": spec.resources.gpu, **{str(k): float(v) for k, v in custom.items()}}


def trial_name(cfg: Any, config: dict) -> str:
    """A readable run name: the methods, then the trial's other values by their last key segment."""
    items = [o.split("=", 1) for o in trial_dotlist(config)]
    if cfg.label:  # the label names the arm: only the seed and the fine-tuning values follow it
        items = [(k, v) for k, v in items if k == "seed" or k.startswith("finetune.")]
    else:
        items = [(k, v) for k, v in items if k not in ("align.method", "finetune.method", "label")]
    values = [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in items]
    return " ".join([cfg.label or f"{cfg.align.method}+{cfg.finetune.method}", *values])


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> tuple[SweepConfig, list[str]]:
    """Read and validate a sweep file. `overrides` starting with `sweep.` set the sweep file's own fields
    (`sweep.space.<dotted key>[.grid]=...` a space entry, `sweep.attack.space.<dotted key>...` an attack's), the rest
    go to every trial's config. Returns the spec and the trials' fixed overrides (paths made absolute, MLflow
    experiment and URI pinned, torch threads = CPUs per trial).
    Raises ConfigError naming the field and value before anything runs."""
    overrides = list(overrides or [])
    raw = read_yaml(path, "sweep")
    own = [o[len("sweep."):] for o in overrides if o.startswith("sweep.")]
    if "uses_ray" in raw or any(o.startswith("uses_ray=") for o in own):
        raise ConfigError("uses_ray", raw.get("uses_ray"), "is set by hftlab, not by sweep files")
    spaces = ("space.", "attack.space.")
    for item in [o for o in own if o.startswith(spaces)]:  # space keys are dotted: sweep.[attack.]space.<key>[.<kind>]=...
        prefix = next(p for p in reversed(spaces) if item.startswith(p))
        key, value = parse_override(item[len(prefix):])
        head, _, last = key.rpartition(".")
        if head and last in KINDS:
            key, value = head, {last: value}
        holder = raw
        if prefix == "attack.space.":
            if not isinstance(raw.get("attack"), dict):
                raw["attack"] = {}
            holder = raw["attack"]
        if not isinstance(holder.get("space"), dict):
            holder["space"] = {}
        holder["space"][key] = value
    spec = build(SweepConfig, apply_overrides(raw, [o for o in own if not o.startswith(spaces)]))
    spec.name = spec.name or Path(path).stem
    base = Path(spec.base) if Path(spec.base).is_absolute() else Path(path).resolve().parent / spec.base
    spec.base = str(base.resolve())
    user = spec.overrides + [o for o in overrides if not o.startswith("sweep.")]
    try:
        cfg = load_config(spec.base, user)
    except ConfigError as exc:
        raise (ConfigError("base", exc.value, exc.reason) if exc.field == "config" else exc) from None
    check(cfg.tracking.enabled, "tracking.enabled", False, "a sweep logs every trial to MLflow")
    fixed = user + [f"output_dir={Path(cfg.output_dir).resolve()}",
                    f"tracking.tracking_uri={_absolute_uri(tracking.resolve_uri(cfg))}",
                    f"tracking.experiment={spec.experiment or spec.name}"]
    if cfg.cache_dir:
        fixed.append(f"cache_dir={Path(cfg.cache_dir).resolve()}")
    if "threads" not in spec.space and not any(o.startswith("threads=") for o in user):
        fixed.append(f"threads={max(1, int(spec.resources.cpu))}")
    spec.uses_ray = _validate_points(spec, fixed)
    return spec, fixed


def _absolute_uri(uri: str) -> str:
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri


def _validate_points(spec: SweepConfig, fixed: list[str]) -> bool:
    """Apply every grid point (ranges: both ends) to the base config; per key alone if there are too many.
    Returns whether some trial starts Ray work of its own (VAA's groups stage, Ray Train workers)."""
    outer = {f"space.{k}": v for k, v in axes(spec.space).items()}
    inner = {f"attack.space.{k}": v for k, v in axes(spec.attack.space).items()}
    reference = {"attack.guard.reference": [spec.attack.guard.reference]} if spec.attack.enabled else {}
    uses_ray = False
    for point in points(outer | inner | reference):
        values = {k.split("space.", 1)[-1] if "space." in k else k: v for k, v in point.items()}
        try:
            cfg = load_config(spec.base, fixed + trial_dotlist(values))
        except ConfigError as exc:
            culprit = next((k for k, short in zip(point, values, strict=True) if exc.field == short
                            or exc.field.startswith(short + ".")
                            or any(o.startswith(exc.field + "=") for o in to_overrides(short, values[short]))), None)
            if culprit is None:
                raise
            raise ConfigError(culprit, point[culprit], f"gives an invalid trial config: {exc}") from None
        uses_ray |= method_of(cfg.align).groups_stage(cfg.align) or max(cfg.align.workers, cfg.finetune.workers) > 1
    return uses_ray
