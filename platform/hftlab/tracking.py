"""MLflow: the only module that imports mlflow.

One run per pipeline invocation, in an experiment named after the config; params are the
flattened dotted config keys (the same names as the CLI overrides); metrics are `<stage>.hs`,
`<stage>.fa`; artifacts are the resolved config, sample generations and the trained weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402

from hftlab.config.loader import flatten, to_dict  # noqa: E402
from hftlab.config.schema import Config  # noqa: E402


def resolve_uri(cfg: Config) -> str:
    """tracking.tracking_uri, else $MLFLOW_TRACKING_URI, else a SQLite store in the working directory."""
    return cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def ui_hint(uri: str) -> str:
    """How a user opens the UI for this store."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000   # then open http://127.0.0.1:5000"


class Tracker:
    """A thin, optional MLflow run: every method is a no-op when tracking is disabled."""

    def __init__(self, cfg: Config, run_name: str | None = None) -> None:
        self.enabled = cfg.tracking.enabled
        self.uri = resolve_uri(cfg)
        self.run_id: str | None = None
        if not self.enabled:
            return
        mlflow.set_tracking_uri(self.uri)
        name = cfg.tracking.experiment or cfg.name
        if self.uri.startswith("sqlite:///") and mlflow.get_experiment_by_name(name) is None:
            # keep a local store's artifacts beside its database, whatever the working directory
            root = Path(self.uri[len("sqlite:///"):]).parent / "mlartifacts"
            try:
                mlflow.create_experiment(name, artifact_location=root.as_uri())
            except mlflow.exceptions.MlflowException:
                pass  # created meanwhile by another process
        mlflow.set_experiment(name)
        run = mlflow.start_run(run_name=run_name)
        self.run_id = run.info.run_id
        params = {k: ("null" if v is None else v) for k, v in flatten(to_dict(cfg)).items()}
        mlflow.log_params(params)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.enabled:
            mlflow.end_run(status="FAILED" if exc_type else "FINISHED")

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        if self.enabled:
            mlflow.log_metrics({k: float(v) for k, v in values.items()}, step=step)

    def tags(self, values: dict[str, Any]) -> None:
        if self.enabled:
            mlflow.set_tags({k: str(v) for k, v in values.items()})

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file or a whole directory."""
        if not self.enabled:
            return
        path = Path(path)
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        else:
            mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def text(self, text: str, name: str) -> None:
        if self.enabled:
            mlflow.log_text(text, name)

    def table(self, columns: dict[str, list], name: str) -> None:
        """A table artifact (JSON, shown as a table in the MLflow UI's artifact view)."""
        if self.enabled:
            mlflow.log_table(data=columns, artifact_file=name)
