"""Sweeps on Ray Tune: one pipeline run per trial, one MLflow parent run per sweep with a child run per trial.

`sweep/spec.py` loads and checks the sweep file; this module runs it. Why it is shaped this way:
- A trial reports twice through `tune.report` (after the aligned model's evaluation, then the fine-tuned
  one's), so an optional ASHA scheduler can stop a trial whose alignment already failed.
- The pipeline reuses every finished stage by its hash under `output_dir`, so a restarted trial redoes
  no finished training; its MLflow child run is found by `ray.trial_id` and continued, never duplicated.
- `hftlab sweep --resume` restores the Tune experiment (`Tuner.restore`) and the same MLflow parent run
  (kept in `<storage_path>/<name>/hftlab-sweep.json`); trials Tune recorded as finished are not run again.
- Paths are made absolute in the driver, and each trial goes back to the driver's working directory
  (Tune starts it in its trial directory), so relative paths in configs mean what they say.
- The best trial is picked from MLflow (not from Tune's results), with the sweep's constraints, and its
  fine-tuned model registered; a saved view of the runs table shows HS/FA columns in the MLflow UI.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import yaml

from hftlab.config.loader import ConfigError, digest, load_config
from hftlab.metrics import stage_metrics
from hftlab.sweep import spec as sweepfile
from hftlab.sweep.space import grid_size
from hftlab.sweep.spec import CONSTRAINT, SweepConfig, load_sweep, swept_keys, trial_dotlist, trial_name
from hftlab.tracking import client as tracking

REPORTS = 2  # after the aligned model's evaluation, and after the whole run: training_iteration 1 and 2
STATE_FILE = "hftlab-sweep.json"


def hftlab_trial(config: dict, setup: dict) -> None:
    """One Tune trial: the pipeline on base + fixed overrides + this trial's values, as a child MLflow run."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if Path(setup["cwd"]).is_dir():
        os.chdir(setup["cwd"])  # relative paths in configs mean the driver's directory, not the trial's
    import ray
    from ray import tune

    from hftlab.run.pipeline import run

    ctx = tune.get_context()
    cfg = load_config(setup["base"], setup["overrides"] + trial_dotlist(config))
    uri, experiment, parent = setup["tracking_uri"], setup["experiment"], setup["parent_run_id"]
    tags = {"hftlab.sweep": setup["name"], "hftlab.role": "trial", "ray.trial_id": ctx.get_trial_id(),
            "ray.trial_name": ctx.get_trial_name(), "ray.job_id": setup["job_id"], "hftlab.git_commit": setup["git_commit"],
            "ray.node_id": ray.get_runtime_context().get_node_id()}  # where it ran: placement by resources.custom

    def on_stage(stage: str, summary: dict) -> None:
        if stage == "aligned":  # where a scheduler may stop the trial (tune.report then raises SystemExit)
            tune.report(stage_metrics(summary))

    summary = run(cfg, log=print, parent_run_id=parent, tags=tags, on_stage=on_stage, run_name=trial_name(cfg, config),
                  run_id=tracking.find_child(uri, experiment, parent, ctx.get_trial_id()))
    tune.report(stage_metrics(summary))  # the last report comes after the run is logged and closed: Tune may end the trial here


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """ray.init for a sweep driver: `address`, else $RAY_ADDRESS, else a new local instance (never a
    cluster that happens to run on this host). Trials keep the driver's directory and quiet tokenizers."""
    import ray

    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, num_cpus=num_cpus if address == "local" else None)


def param_space(spec: SweepConfig) -> dict:
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v)}
    return {key: make[kind](values) for key, dist in spec.space.items() for kind, values in dist.items()}


def ray_job_id() -> str:
    """The Ray job this driver belongs to (runtime context, else $RAY_JOB_ID); "" outside Ray."""
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context().get_job_id()
    return os.environ.get("RAY_JOB_ID", "")


def best_trial(spec: SweepConfig, runs: list[dict]) -> dict | None:
    """The finished child run with the best metric among those meeting every constraint."""
    def ok(r: dict) -> bool:
        for item in spec.constraints:
            key, op, bound = CONSTRAINT.match(item).groups()
            value = r["metrics"].get(key)
            if value is None or (value < float(bound) if op == ">=" else value > float(bound)):
                return False
        return r["status"] == "FINISHED" and spec.metric in r["metrics"]

    sign = 1 if spec.mode == "min" else -1
    eligible = [r for r in runs if ok(r)]
    return min(eligible, key=lambda r: sign * r["metrics"][spec.metric]) if eligible else None


class PlainTrials:
    """A plain sweep's trials: one pipeline run each (hftlab_trial), the best picked by the sweep's metric and
    constraints and its fine-tuned model registered. A nested attack sweep swaps in sweep/attacks.NestedTrials."""

    shown = ("finetuned.hs", "finetuned.fa", "aligned.hs", "aligned.fa")

    def metric(self, spec: SweepConfig) -> str:
        return spec.metric

    def running(self, spec: SweepConfig) -> int:
        """Pipeline runs at once."""
        return spec.max_concurrent_trials

    def trainable(self, spec: SweepConfig, setup: dict, exp_dir: Path):
        from ray import tune

        return tune.with_resources(tune.with_parameters(hftlab_trial, setup=setup),
                                   lambda config: tune.PlacementGroupFactory([sweepfile.trial_resources(spec, config)]))

    def close_unfinished(self, uri: str, experiment: str, runs: list[dict]) -> None:
        """Nothing below a trial's run to close."""

    def best(self, spec: SweepConfig, uri: str, parent: str, runs: list[dict]) -> tuple[dict | None, object]:
        """The best trial, logged on the parent run, its model registered when the sweep says so."""
        best, version = best_trial(spec, runs), None
        if best is None:
            return None, None
        values = {k: best["metrics"][k] for k in ("finetuned.hs", "finetuned.fa", "aligned.hs") if k in best["metrics"]}
        tracking.log_metrics(uri, parent, {f"best.{k}": v for k, v in values.items()})
        tracking.set_tags(uri, parent, {"hftlab.best_run_id": best["run_id"]})
        if spec.register is not None:
            tags = {"hs": values.get("finetuned.hs"), "fa": values.get("finetuned.fa"), "hftlab.sweep": spec.name,
                    **{k: best["tags"].get(k) for k in ("ray.trial_id", "hftlab.config_hash", "hftlab.git_commit")}}
            version = tracking.register_model(uri, best["run_id"], "model/finetuned", spec.register or f"hftlab-{spec.name}",
                                              tags, alias="best")
        return best, version


def trials_of(spec: SweepConfig):
    """What this sweep's trials are: plain pipeline runs, or defenses each running an attack search."""
    if spec.attack.enabled:
        from hftlab.sweep.attacks import NestedTrials

        return NestedTrials()
    return PlainTrials()


def run_sweep(path: str | Path, overrides: list[str] | None = None, resume: bool = False, log=print,
              loaded: tuple[SweepConfig, list[str]] | None = None) -> dict:
    """Run (or resume) a sweep on the Ray instance this process is connected to (`connect()` first).

    `loaded`: what load_sweep(path, overrides) returned, when the caller has checked it already.
    Returns parent_run_id, experiment, tracking_uri, path (the Tune experiment), trials, errors,
    interrupted, best (the best child run or None), model_version and ui (the runs table's URL path)."""
    import ray
    from ray import tune

    spec, fixed = loaded or load_sweep(path, overrides)
    kind = trials_of(spec)
    exp_dir = Path(spec.storage_path).resolve() / spec.name
    state_file = exp_dir / STATE_FILE
    cpus = ray.cluster_resources().get("CPU", 0)
    running = kind.running(spec)
    if spec.uses_ray and running * spec.resources.cpu > cpus - 1:
        raise ConfigError("max_concurrent_trials", spec.max_concurrent_trials,
                          f"trials start Ray work of their own (VAA's groups stage on Ray Data, or workers > 1): "
                          f"leave at least one of the cluster's {cpus:g} CPUs outside the trials "
                          f"(resources.cpu={spec.resources.cpu:g} each)")
    spec_hash = digest({"spec": spec, "fixed": fixed})
    if resume:
        if not state_file.is_file() or not tune.Tuner.can_restore(str(exp_dir)):
            raise ConfigError("--resume", str(exp_dir), "holds no interrupted sweep to resume")
        setup = json.loads(state_file.read_text())
        if setup["spec_hash"] != spec_hash:
            raise ConfigError("--resume", str(path), "the sweep file or its overrides changed since the sweep started")
        tracking.set_status(setup["tracking_uri"], setup["parent_run_id"], "RUNNING")
        log(f"resuming sweep {spec.name}: {exp_dir}")
    else:
        if state_file.exists() or tune.Tuner.can_restore(str(exp_dir)):
            raise ConfigError("name", spec.name, f"{exp_dir} already holds this sweep: pass --resume, or set sweep.name")
        setup = start(spec, fixed, exp_dir, spec_hash)
        log(f"sweep {spec.name}: Tune experiment {exp_dir}, MLflow parent run {setup['parent_run_id']}")

    if missing := sorted(sweepfile.custom_resources(spec) - set(ray.cluster_resources())):  # an autoscaler may add one
        log(f"warning: no node of this cluster has the custom resources {missing}: their trials wait for one")
    trainable = kind.trainable(spec, setup, exp_dir)
    if resume:
        tuner = tune.Tuner.restore(str(exp_dir), trainable, resume_errored=True)
    else:
        scheduler = None
        if spec.scheduler.kind == "asha":
            from ray.tune.schedulers import ASHAScheduler

            sc = spec.scheduler
            scheduler = ASHAScheduler(metric=sc.metric, mode=sc.mode, max_t=REPORTS,
                                      grace_period=sc.grace_period, reduction_factor=sc.reduction_factor)
        # no metric here: the first report has no finetuned.* yet, and the best trial is picked from MLflow
        tune_config = tune.TuneConfig(scheduler=scheduler, num_samples=spec.num_samples,
                                      max_concurrent_trials=spec.max_concurrent_trials)
        run_config = tune.RunConfig(storage_path=str(exp_dir.parent), name=spec.name,
                                    failure_config=tune.FailureConfig(max_failures=spec.max_failures))
        tuner = tune.Tuner(trainable, param_space=param_space(spec), tune_config=tune_config, run_config=run_config)
    grid = tuner.fit()
    interrupted = unfinished(spec, grid.num_terminated + grid.num_errors, len(grid))
    return finish(spec, kind, setup, exp_dir, len(grid), grid.num_errors, interrupted, log)


def unfinished(spec: SweepConfig, ended: int, created: int) -> bool:
    """Whether Tune returned before every planned trial ended (Ctrl+C: it saved its state and returned). The planned
    count, not the trials created: a grid's trials are created as slots free up, so an interrupted 8-point grid may
    hold 4 (a sweep stopped after 3 of 8 was once reported finished and its best model registered)."""
    return ended < max(created, grid_size(spec.space) * spec.num_samples)


def start(spec: SweepConfig, fixed: list[str], exp_dir: Path, spec_hash: str) -> dict:
    """Create the MLflow parent run and write what a trial (and a resume) needs into the Tune experiment dir."""
    uri = next(o.split("=", 1)[1] for o in fixed if o.startswith("tracking.tracking_uri="))
    setup = {"name": spec.name, "base": spec.base, "overrides": fixed, "cwd": os.getcwd(), "tracking_uri": uri,
             "experiment": spec.experiment or spec.name, "job_id": ray_job_id(), "git_commit": tracking.git_commit(),
             "spec_hash": spec_hash, "parent_run_id": ""}
    setup["parent_run_id"] = tracking.start_parent(
        uri, setup["experiment"], spec.name,
        tags={"hftlab.sweep": spec.name, "hftlab.role": "sweep", "hftlab.config_hash": spec_hash,
              "hftlab.nested": str(spec.attack.enabled).lower(),
              "ray.job_id": setup["job_id"], "ray.experiment_path": str(exp_dir), "hftlab.machine": tracking.machine(),
              "hftlab.git_commit": setup["git_commit"]},
        params={"sweep.base": spec.base, "sweep.metric": spec.metric, "sweep.mode": spec.mode,
                "sweep.num_samples": spec.num_samples, "sweep.space": json.dumps(spec.space)[:6000]})
    exp_dir.mkdir(parents=True, exist_ok=True)
    (exp_dir / STATE_FILE).write_text(json.dumps(setup, indent=1))
    (exp_dir / "sweep.yaml").write_text(yaml.safe_dump({"sweep": asdict(spec), "fixed": fixed}, sort_keys=False))
    tracking.log_artifacts(uri, setup["parent_run_id"], exp_dir, "sweep")
    return setup


def finish(spec: SweepConfig, kind, setup: dict, exp_dir: Path, n_trials: int, n_errors: int, interrupted: bool,
           log=print) -> dict:
    """After the trials: close runs left open, register the best model, tag the parent, save the UI view."""
    uri, experiment, parent = setup["tracking_uri"], setup["experiment"], setup["parent_run_id"]
    tracking.close_unfinished(uri, experiment, parent)  # killed mid-pipeline (by ASHA or the interruption)
    runs = tracking.children(uri, experiment, parent)
    kind.close_unfinished(uri, experiment, runs)
    stopped = [r["run_id"] for r in runs if r["status"] == "KILLED"]
    metric = kind.metric(spec)
    best, version = (None, None) if interrupted else kind.best(spec, uri, parent, runs)
    columns = [f"metrics.{m}" for m in kind.shown]
    ui = tracking.share_view(uri, experiment, f"hftlab-{spec.name}", columns + [f"params.{k}" for k in swept_keys(spec)],
                             [parent], metric)
    tracking.set_status(uri, parent, "KILLED" if interrupted else "FAILED" if n_errors else "FINISHED")
    if interrupted:
        log(f"sweep {spec.name} interrupted: continue it with `hftlab sweep ... --resume` (same file and overrides)")
    else:
        log(f"sweep {spec.name}: {n_trials} trials, {n_errors} errors, {len(stopped)} stopped early; best "
            f"{best['run_name'] if best else None} {metric}={best['metrics'][metric] if best else None}; "
            f"registered version {version}")
    return {"parent_run_id": parent, "experiment": experiment, "tracking_uri": uri, "path": str(exp_dir),
            "trials": n_trials, "errors": n_errors, "interrupted": interrupted, "stopped": stopped, "best": best,
            "model_version": version, "ui": ui}
