"""Shared fixtures: the smoke-scale config with its own cache, outputs and MLflow store per test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one torch thread in the test process and its children unless a test or config asks for more (configs/smoke.yaml
# says why: the toy model's two threads stall beside another busy process); the real-model configs set their own
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Ray Train's controller polls its workers every 2 s and starts a preemption watcher actor per run: ~3 s of a test's
# ~20 s Ray Train run (6 toy steps) on the idle 2-core machine, 18 such runs in the suite. Tests only.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

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


def wait_healthy(url: str, proc, log_path: Path, what: str, timeout: float = 120) -> None:
    """Poll `url`/health until it answers 200; raise with the log's tail if the process dies or time runs out."""
    import time
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"{what} did not start: {Path(log_path).read_text()[-3000:]}")
        time.sleep(0.5)


def stop_group(proc) -> None:
    """SIGTERM the process group a test started (start_new_session=True), SIGKILL if it lingers: nothing else."""
    import signal
    import subprocess

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, proxied artifacts); yields its URL."""
    import subprocess
    import sys

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "mlflow-server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # else it leaves a directory in /dev/shm
    )
    try:
        wait_healthy(url, proc, tmp_path / "mlflow-server.log", "mlflow server")
        yield url
    finally:
        stop_group(proc)
        log.close()


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance for the session (2 CPUs), shut down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, log_to_driver=False)  # our own, even beside a `ray start` cluster
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_cluster():
    """A real Ray cluster of a head and two worker nodes on this machine, started by infra/local/ray-cluster.sh.

    Head: `ray start --head --num-cpus 0` (like the KubeRay head: it schedules no work) with the dashboard /
    Jobs API on 127.0.0.1; workers: `ray start --address` with 1 CPU and the custom resource worker1 / worker2
    (so a test can place work on each), each node with its own temp dir. Every port is a free one and the temp
    dirs are our own, so it never collides with another Ray instance on the host; token auth uses a fresh token
    passed by environment (~/.ray/auth_token is left alone). Yields a dict: dashboard (http URL), gcs
    (host:port), env (for `ray` CLI subprocesses), token, dashboard_port, workers ({"worker1": node id, ...}).
    Stops only what it started: SIGTERM, then SIGKILL, to the process groups the script reports, then any
    process carrying our token.
    """
    import json
    import re
    import secrets
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    bindir = str(Path(sys.executable).parent)
    temp_dir = tempfile.mkdtemp(prefix="hftray-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    token = secrets.token_hex(16)
    gcs_port, dash_port = free_port(), free_port()
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0", PYTHON=sys.executable,
               PATH=f"{bindir}:{os.environ.get('PATH', '')}", RAY_PORT=str(gcs_port), RAY_DASHBOARD_PORT=str(dash_port),
               RAY_TEMP_DIR=temp_dir, WORKERS="2", WORKER_CPUS="1")
    env.pop("RAY_ADDRESS", None)
    groups: list[int] = []

    def logs() -> str:
        return "\n".join(f"--- {name}\n" + (Path(temp_dir) / name).read_text()[-1500:]
                         for name in ("head.log", "worker1.log", "worker2.log") if (Path(temp_dir) / name).is_file())

    def alive_nodes() -> list[dict]:
        out = subprocess.run([f"{bindir}/ray", "list", "nodes", "--address", f"http://127.0.0.1:{dash_port}",
                              "--filter", "state=ALIVE", "--format", "json", "--detail"], env=env, capture_output=True,
                             text=True)
        try:
            return json.loads(out.stdout)
        except ValueError:  # "No resource in the cluster", or the head not answering yet
            return []

    try:
        out = subprocess.run(["bash", str(REPO / "infra" / "local" / "ray-cluster.sh")], env=env, capture_output=True,
                             text=True, timeout=180)
        groups = [int(g) for g in re.findall(r"(?:head|worker)_pgid=(\d+)", out.stdout)]
        assert out.returncode == 0 and len(groups) == 3, f"{out.stdout}\n{out.stderr}\n{logs()}"
        deadline = time.time() + 120
        while len(nodes := alive_nodes()) != 3:
            if time.time() > deadline:
                raise RuntimeError(f"the Ray worker nodes did not join:\n{logs()}")
            time.sleep(1)
        workers = {name: n["node_id"] for n in nodes for name in n["resources_total"] if name.startswith("worker")}
        assert sorted(workers) == ["worker1", "worker2"], nodes
        yield {"dashboard": f"http://127.0.0.1:{dash_port}", "gcs": f"127.0.0.1:{gcs_port}", "env": env,
               "token": token, "dashboard_port": dash_port, "workers": workers}
    finally:
        for sig, grace in ((signal.SIGTERM, 3), (signal.SIGKILL, 5)):
            for pgid in reversed(groups):  # worker first, then head: each `ray start` leads its own process group
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + grace
            while time.time() < deadline and any(_group_alive(g) for g in groups):
                time.sleep(0.2)
        _kill_processes_with_token(token)  # a job driver or worker that left the groups carries our token
        shutil.rmtree(temp_dir, ignore_errors=True)


def _group_alive(pgid: int) -> bool:
    """Whether a process group still has a live (non-zombie) member."""
    import psutil

    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (psutil.Error, OSError):
            pass
    return False


def _kill_processes_with_token(token: str) -> None:
    """SIGKILL every process whose environment holds this (random, per-cluster) Ray token: ours alone."""
    import psutil

    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get("RAY_AUTH_TOKEN") == token:
                proc.kill()
        except (psutil.Error, OSError):
            pass


@contextmanager
def serve_script(script: Path, tmp_path: Path, **env_extra: str) -> Iterator[tuple[str, int]]:
    """Run one of infra/'s MLflow server scripts as its own process group on a free port, with the script's default
    host binding (MLFLOW_HOST unset: that binding is under test); yield (url, port) once healthy, stop the group after."""
    import subprocess
    import sys

    port = free_port()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", MLFLOW_PORT=str(port),
               **env_extra)
    env.pop("MLFLOW_HOST", None)
    with open(tmp_path / "mlflow.log", "w") as log:
        proc = subprocess.Popen(["bash", str(script)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, proc, tmp_path / "mlflow.log", script.name)
            yield url, port
        finally:
            stop_group(proc)  # the script leads its own group: it, mlflow and the server's workers
