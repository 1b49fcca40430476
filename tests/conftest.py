"""Shared fixtures: the smoke-scale config with its own cache, outputs and MLflow store per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hftlab.config import Config, load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# real public data (BeaverTails rows, AlpacaEval) lives beside the checkout, never in it
SHARED_DATA = Path(os.environ.get("HFTLAB_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """One tiny-model cache per test session: the smoke base is built once (~10 s), then reused."""
    return tmp_path_factory.mktemp("hftlab-cache")


@pytest.fixture
def smoke(tmp_path: Path, tiny_cache: Path):
    """Factory: configs/smoke.yaml + overrides, writing only under this test's tmp_path."""

    def make(*overrides: str) -> Config:
        base = [f"output_dir={tmp_path / 'outputs'}", f"cache_dir={tiny_cache}",
                f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
        return load_config(REPO / "configs" / "smoke.yaml", base + list(overrides))

    return make


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, proxied artifacts); yields its URL."""
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "mlflow-server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(tmp_path / 'mlflow-server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance for the session (2 CPUs), shut down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, log_to_driver=False)  # our own, even beside a `ray start` cluster
    yield ray
    ray.shutdown()
