"""MLflow helpers: URIs, experiments, sweeps' parent and child runs, reading runs back (tracking/logger.py: a run's Tracker).

One run per pipeline invocation, in an experiment named after the config; params are the
flattened dotted config keys (the same names as the CLI overrides); metrics are `<stage>.hs`,
`<stage>.fa`; artifacts are the resolved config, sample generations and the trained weights.

A sweep adds one parent run (`start_parent`) with a child run per trial (`Tracker(parent_run_id=...)`,
which MLflow records as the `mlflow.parentRunId` tag); a restarted trial continues its own child run
(`find_child` + `Tracker(run_id=...)`), so a resumed sweep never holds two runs for one trial. The
helpers below take a tracking URI and use an `MlflowClient`, so the sweep driver and `hftlab report`
never touch the fluent API's process-global active run.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402

from hftlab.config.schema import Config  # noqa: E402
from hftlab.tracking.store import prepare  # noqa: E402


def resolve_uri(cfg: Config) -> str:
    """tracking.tracking_uri, else $MLFLOW_TRACKING_URI, else a SQLite store in the working directory."""
    return cfg.tracking.tracking_uri or default_uri()


def default_uri() -> str:
    """$MLFLOW_TRACKING_URI, else a SQLite store in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def open_client(uri: str) -> mlflow.MlflowClient:
    """An MlflowClient on `uri`, once a local store there is whole (mlflow_store.prepare: made atomically if new)."""
    prepare(uri)
    return mlflow.MlflowClient(uri)


def redact(uri: str) -> str:
    """A URI with its password replaced (`http://user:***@host`): what is logged, printed or stored as a param."""
    import re

    return re.sub(r"(://[^/:@\s]*):[^/@\s]*@", r"\1:***@", uri) if isinstance(uri, str) else uri


def ui_hint(uri: str) -> str:
    """How a user opens the UI for this store (its password redacted)."""
    uri = redact(uri)
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000   # then open http://127.0.0.1:5000"


def is_rank_zero() -> bool:
    """Only rank 0 logs: a process that torchrun or Ray Train started as rank k > 0 has RANK=k."""
    return os.environ.get("RANK", "0") == "0"


@functools.cache
def machine() -> str:
    """What ran this, for a report's provenance line: host, CPU count, memory and GPU if any."""
    import os
    import platform as stdlib_platform

    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else float("nan")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{stdlib_platform.node()}: {os.cpu_count()} CPUs ({stdlib_platform.machine()}), {mem:.0f} GiB, {gpu}"


def git_commit() -> str:
    """HEAD of the checkout this package runs from (+ "-dirty" with uncommitted changes); "unknown" outside git."""
    here = str(Path(__file__).resolve().parent)
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def ensure_experiment(uri: str, name: str) -> str:
    """The id of experiment `name`, created if missing (a local store keeps artifacts beside its database).

    New experiments are tagged as model-training ones (`mlflow.experimentKind`), which is what they are.
    """
    client = open_client(uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # keep a local store's artifacts beside its database, whatever the cwd
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location,
                                        tags={"mlflow.experimentKind": "custom_model_development"})
    except mlflow.exceptions.MlflowException:  # created meanwhile by another process
        return client.get_experiment_by_name(name).experiment_id


def orphaned_run(uri: str, experiment_id: str, config_hash: str, run_name: str | None) -> tuple[str, str] | None:
    """(run id, its driver) of a top-level run of this config and name left RUNNING by a driver on this host that is
    no longer alive; None if there is none (a live driver's run is never taken: two runs of one config may race)."""
    client = open_client(uri)
    found = client.search_runs([experiment_id], f"tags.`hftlab.config_hash` = '{config_hash}' and attributes.status = "
                               "'RUNNING'", max_results=100, order_by=["attributes.start_time DESC"])
    for run in found:
        tags = run.data.tags
        host, _, pid = tags.get("hftlab.driver", "").rpartition(":")
        if run.info.run_name != run_name or "mlflow.parentRunId" in tags or host != socket.gethostname():
            continue
        if pid.isdigit() and not _alive(int(pid)):
            return run.info.run_id, tags["hftlab.driver"]
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- sweeps: parent runs, children, the registry; reports: reading runs back ------------------------------

def start_parent(uri: str, experiment: str, run_name: str, tags: dict[str, Any], params: dict[str, Any]) -> str:
    """Create a sweep's parent run (status RUNNING) and return its id; trials nest under it."""
    client = open_client(uri)
    all_tags = {"hftlab.git_commit": git_commit(), "mlflow.runName": run_name, **tags}
    run = client.create_run(ensure_experiment(uri, experiment), run_name=run_name,
                            tags={k: str(v) for k, v in all_tags.items()})
    for key, value in params.items():
        client.log_param(run.info.run_id, key, "null" if value is None else value)
    return run.info.run_id


def set_status(uri: str, run_id: str, status: str) -> None:
    """RUNNING (a resumed sweep's parent), FINISHED, FAILED or KILLED."""
    client = open_client(uri)
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    else:
        client.set_terminated(run_id, status=status)


def set_tags(uri: str, run_id: str, tags: dict[str, Any]) -> None:
    client = open_client(uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))


def log_metrics(uri: str, run_id: str, values: dict[str, float]) -> None:
    client = open_client(uri)
    for key, value in values.items():
        client.log_metric(run_id, key, float(value))


def log_artifacts(uri: str, run_id: str, local_dir: str | Path, artifact_path: str | None = None) -> None:
    open_client(uri).log_artifacts(run_id, str(local_dir), artifact_path)


def read_artifact_text(uri: str, run_id: str, path: str) -> str | None:
    """A run's text artifact (e.g. verdicts/finetuned.json), or None when it has none there."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, tracking_uri=uri, dst_path=tmp)
        except (mlflow.exceptions.MlflowException, OSError):
            return None
        return Path(local).read_text() if Path(local).is_file() else None


def _as_dict(run) -> dict:
    return {"run_id": run.info.run_id, "run_name": run.info.run_name, "status": run.info.status,
            "start_time": run.info.start_time, "end_time": run.info.end_time, "artifact_uri": run.info.artifact_uri,
            "params": dict(run.data.params), "metrics": dict(run.data.metrics), "tags": dict(run.data.tags)}


def get_run(uri: str, run_id: str) -> dict:
    """One run as a plain dict (the fields of `search_runs`)."""
    return _as_dict(open_client(uri).get_run(run_id))


def search_runs(uri: str, experiment: str, filter_string: str = "") -> list[dict]:
    """Every run of `experiment` matching an MLflow filter, oldest first, as plain dicts:
    run_id, run_name, status, start_time, end_time, artifact_uri, params, metrics (latest values), tags.
    An experiment that does not exist has no runs."""
    client = open_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    out, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string, max_results=1000, page_token=token,
                                  order_by=["attributes.start_time ASC"])
        out += [_as_dict(r) for r in page]
        token = page.token
        if not token:
            return out


def experiment_id(uri: str, experiment: str) -> str | None:
    exp = open_client(uri).get_experiment_by_name(experiment)
    return exp.experiment_id if exp else None


def children(uri: str, experiment: str, parent_run_id: str) -> list[dict]:
    """The child runs of one parent (the trials of one sweep)."""
    return search_runs(uri, experiment, f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def find_child(uri: str, experiment: str, parent_run_id: str, trial_id: str) -> str | None:
    """The child run a trial already started (it is being restarted), else None."""
    runs = search_runs(uri, experiment, f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`ray.trial_id` = '{trial_id}'")
    return runs[0]["run_id"] if runs else None


def close_unfinished(uri: str, experiment: str, parent_run_id: str, status: str = "KILLED") -> list[str]:
    """End the children still RUNNING once a sweep is over: trials a scheduler stopped early are killed
    mid-pipeline and cannot end their own run. Returns their ids."""
    ids = [r["run_id"] for r in children(uri, experiment, parent_run_id) if r["status"] == "RUNNING"]
    for run_id in ids:
        set_status(uri, run_id, status)
    return ids


def register_model(uri: str, run_id: str, artifact_path: str, name: str, tags: dict[str, Any], alias: str) -> str:
    """Register a run's artifact directory as a new version of model `name`; `alias` points at it.

    `mlflow.register_model("runs:/...")` only accepts MLflow-format logged models in MLflow 3, and
    our stages are plain HF/peft directories, so the version is created from the artifact URI.
    Returns the version number.
    """
    client = open_client(uri)
    try:
        client.create_registered_model(name, description="hftlab: the best fine-tuned model of a sweep")
    except mlflow.exceptions.MlflowException:
        pass  # exists
    run = client.get_run(run_id)
    version = client.create_model_version(name, source=f"{run.info.artifact_uri}/{artifact_path}", run_id=run_id,
                                          tags={k: str(v) for k, v in tags.items()})
    client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def model_version(uri: str, name: str, alias: str) -> dict:
    """The version an alias points at: version, run_id, source, tags."""
    v = open_client(uri).get_model_version_by_alias(name, alias)
    return {"version": str(v.version), "run_id": v.run_id, "source": v.source, "tags": dict(v.tags)}


def share_view(uri: str, experiment: str, key: str, columns: list[str], expanded: list[str], order_by: str) -> str:
    """Save a view of the experiment's runs table and return its URL path (after the server's address).

    The MLflow UI shows no metric columns by default; its "share view" feature stores the table state
    (selected columns, sort, expanded parent rows) as the experiment tag `mlflow.sharedViewState.<key>`
    and opens it from `#/experiments/<id>/runs?viewStateShareKey=<key>`. `columns` are dotted names
    prefixed with `metrics.` or `params.`.
    """
    exp_id = ensure_experiment(uri, experiment)
    kind_key = [c.split(".", 1) for c in columns]
    state = {"searchFilter": "", "orderByKey": f"metrics.`{order_by}`", "orderByAsc": True,
             "selectedColumns": [f"{kind}.`{name}`" for kind, name in kind_key],
             "runsExpanded": {run_id: True for run_id in expanded}}
    open_client(uri).set_experiment_tag(exp_id, f"mlflow.sharedViewState.{key}", json.dumps(state))
    return f"#/experiments/{exp_id}/runs?viewStateShareKey={key}"
