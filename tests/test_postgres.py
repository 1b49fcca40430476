"""The project's MLflow server (infra/mlflow/serve.sh) against a real PostgreSQL, with authentication on.

The Kubernetes deployment (infra/mlflow/mlflow.yaml) runs exactly this script with a PostgreSQL backend
store; this test runs it against Debian's PostgreSQL, started here in a throwaway data directory on a free
port on 127.0.0.1 (as the `postgres` user when the tests run as root: PostgreSQL refuses root). It checks
that the server binds 127.0.0.1 by default, refuses anonymous requests, and that a run logged by an
authenticated user lands in PostgreSQL and reads back. Skipped, with the reason, only where PostgreSQL's
server binaries are absent (`.ci/run` installs them from Debian as root).
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO, free_port, serve_script

pytestmark = pytest.mark.slow

INITDB = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))


def _as_postgres_user() -> Callable[[list[str]], list[str]]:
    """PostgreSQL will not run as root: under root, run its commands as the `postgres` user (Debian's package makes it)."""
    if os.geteuid() != 0:
        return lambda cmd: cmd
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as (apt-get install postgresql makes it)")
    return lambda cmd: ["runuser", "-u", "postgres", "--", *cmd]


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL server on 127.0.0.1 with databases mlflow and mlflow_auth; yields postgresql://user:pw@host:port."""
    if not INITDB:
        pytest.skip("PostgreSQL's server binaries are not installed (/usr/lib/postgresql/*/bin/initdb): "
                    "`apt-get install -y postgresql` (what .ci/run does as root)")
    psycopg = pytest.importorskip("psycopg", reason="psycopg (the dev extra) is not installed")
    bindir, wrap = INITDB[-1].parent, _as_postgres_user()
    root = Path(tempfile.mkdtemp(prefix="hftpg-"))  # not pytest's tmp_path: its parents are closed to `postgres`
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
    password, port = secrets.token_hex(12), free_port()
    (root / "pw").write_text(password)
    if os.geteuid() == 0:
        os.chown(root / "pw", user.pw_uid, user.pw_gid)
    data = root / "data"

    def pg(*cmd: str) -> None:
        out = subprocess.run(wrap([str(bindir / cmd[0]), *cmd[1:]]), capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"{' '.join(cmd)}:\n{out.stdout}\n{out.stderr}"

    started = False
    try:
        pg("initdb", "-D", str(data), "-U", "hftlab", f"--pwfile={root / 'pw'}", "--auth=scram-sha-256",
           "--encoding=UTF8", "--no-instructions")
        pg("pg_ctl", "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60", "start",
           "-o", f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root}")
        started = True
        with psycopg.connect(host="127.0.0.1", port=port, user="hftlab", password=password, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute("CREATE DATABASE mlflow")
            conn.execute("CREATE DATABASE mlflow_auth")
        yield f"postgresql://hftlab:{password}@127.0.0.1:{port}"
    finally:
        if started:
            pg("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def mlflow_on_postgres(postgres: str, tmp_path: Path) -> Iterator[dict]:
    """infra/mlflow/serve.sh, as the Deployment runs it, on PostgreSQL; artifacts in a directory. Yields url + admin login."""
    admin_password = secrets.token_urlsafe(18)
    with serve_script(REPO / "infra" / "mlflow" / "serve.sh", tmp_path,
                      MLFLOW_BACKEND_STORE_URI=f"{postgres}/mlflow", MLFLOW_AUTH_DATABASE_URI=f"{postgres}/mlflow_auth",
                      MLFLOW_ARTIFACTS_DESTINATION=str(tmp_path / "artifacts"), MLFLOW_AUTH_ADMIN_PASSWORD=admin_password,
                      MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16), MLFLOW_WORKERS="1") as (url, port):
        yield {"url": url, "port": port, "admin": ("admin", admin_password), "postgres": postgres}


def test_mlflow_server_on_postgres_with_auth(mlflow_on_postgres: dict, monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    """Loopback by default, anonymous requests refused, a user's run stored in PostgreSQL and read back."""
    url, port = mlflow_on_postgres["url"], mlflow_on_postgres["port"]
    listening = {c.laddr.ip for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    assert listening and listening <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening

    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/search?max_results=5", timeout=10)
    assert refused.value.code == 401

    # the admin creates the account Ray jobs log with (docs/cluster.md), then that account logs a run
    from mlflow.server import get_app_client

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", mlflow_on_postgres["admin"][0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", mlflow_on_postgres["admin"][1])
    runner_password = secrets.token_urlsafe(18)
    get_app_client("basic-auth", tracking_uri=url).create_user("hftlab-runner", runner_password)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "hftlab-runner")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", runner_password)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=url)
    experiment_id = client.create_experiment("postgres-check")
    run = client.create_run(experiment_id, run_name="sft+sft-p0.1")
    client.log_param(run.info.run_id, "finetune.poison_ratio", "0.1")
    client.log_metric(run.info.run_id, "finetuned.hs", 42.5)
    (tmp_path / "resolved.yaml").write_text("seed: 0\n")
    client.log_artifact(run.info.run_id, str(tmp_path / "resolved.yaml"), "config")
    client.set_terminated(run.info.run_id)

    got = client.get_run(run.info.run_id)
    assert got.data.metrics["finetuned.hs"] == 42.5
    assert got.data.params["finetune.poison_ratio"] == "0.1"
    assert got.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "config")] == ["config/resolved.yaml"]

    # and it is PostgreSQL that holds them: the run in the tracking database, the user in the auth database
    import psycopg

    with psycopg.connect(f"{mlflow_on_postgres['postgres']}/mlflow") as conn:
        rows = conn.execute("SELECT value FROM metrics WHERE run_uuid = %s AND key = 'finetuned.hs'", (run.info.run_id,))
        assert rows.fetchall() == [(42.5,)]
    with psycopg.connect(f"{mlflow_on_postgres['postgres']}/mlflow_auth") as conn:
        users = conn.execute("SELECT username FROM users ORDER BY username").fetchall()
        assert [u for (u,) in users] == ["admin", "hftlab-runner"]
