"""The cluster path, end to end, on real processes: `ray start` head + worker, `ray job submit`, MLflow server.

What issue 7 promises a user of a real cluster, checked on one machine: the toy-world pipeline submitted
exactly as docs/cluster.md says (`ray job submit --working-dir . --runtime-env infra/runtime_env.yaml --
python jobs/run.py ...`) runs to SUCCEEDED on a head with no CPUs plus one worker node, takes its
tracking server and shared storage from the runtime env alone (no overrides on the command line), and
its run is then found on a real `mlflow server`. The dashboard / Jobs API is bound to 127.0.0.1 and
refuses requests without the cluster's token (ShadowRay, CVE-2023-48022). The cluster has two worker nodes: a
sweep submitted the same way (`jobs/sweep.py`) puts one trial on each by custom resources, and the trials share
one aligned model through the storage path.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import REPO, serve_script

pytestmark = pytest.mark.slow
# the smoke world with fewer training steps and eval prompts (the base model is the shared cached one)
SMALLER = ("align.epochs=1", "finetune.epochs=1", "finetune.n=200", "eval.n_harmful=20", "eval.n_task=20")


@pytest.fixture
def local_mlflow(tmp_path: Path) -> Iterator[str]:
    """A real MLflow server started by infra/local/mlflow-server.sh (SQLite, proxied artifacts); yields its URL."""
    with serve_script(REPO / "infra" / "local" / "mlflow-server.sh", tmp_path, MLFLOW_HOME=str(tmp_path)) as (url, port):
        assert _listen_addresses(port) <= {"127.0.0.1", "::ffff:127.0.0.1"}
        yield url


def _listen_addresses(port: int) -> set[str]:
    return {c.laddr.ip for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def test_dashboard_is_loopback_only_and_needs_the_token(ray_cluster: dict) -> None:
    """The Jobs API can run any code: it must listen on 127.0.0.1 alone and reject a request without the token."""
    assert _listen_addresses(ray_cluster["dashboard_port"]) <= {"127.0.0.1", "::ffff:127.0.0.1"}
    assert _listen_addresses(ray_cluster["dashboard_port"]), "nothing listens on the dashboard port"
    url = f"{ray_cluster['dashboard']}/api/jobs/"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=10)
    assert refused.value.code in (401, 403)
    assert isinstance(_api(ray_cluster, "/api/jobs/"), list)


def _api(cluster: dict, path: str) -> dict:
    request = urllib.request.Request(cluster["dashboard"] + path, headers={"Authorization": f"Bearer {cluster['token']}"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.loads(resp.read())


def _ray(cluster: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """The `ray` CLI against our cluster, as a user would type it (RAY_ADDRESS + token in the environment)."""
    env = dict(cluster["env"], RAY_ADDRESS=cluster["dashboard"])
    return subprocess.run([str(Path(sys.executable).parent / "ray"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_pipeline_job_runs_on_the_cluster_and_logs_to_mlflow(ray_cluster: dict, local_mlflow: str, tmp_path: Path,
                                                             tiny_cache: Path) -> None:
    """`ray job submit` of jobs/run.py on the smoke config: SUCCEEDED, outputs on the storage path, run in MLflow."""
    storage = tmp_path / "shared"
    runtime_env = yaml.safe_load((REPO / "infra" / "runtime_env.yaml").read_text())
    # the only edits: this machine's services instead of the in-cluster ones the file names
    runtime_env["env_vars"].update(MLFLOW_TRACKING_URI=local_mlflow, HFTLAB_STORAGE_PATH=str(storage),
                                   HFTLAB_CACHE=str(tiny_cache), HF_HOME=str(tmp_path / "hf"))
    env_file = tmp_path / "runtime_env.yaml"
    env_file.write_text(yaml.safe_dump(runtime_env))

    # `ray job submit` waits for the end of the job and streams its logs; the overrides only make it smaller
    submit = _ray(ray_cluster, "job", "submit", "--submission-id", "hftlab-smoke", "--working-dir", ".",
                  "--runtime-env", str(env_file), "--", "python", "jobs/run.py", "--config", "configs/smoke.yaml",
                  *SMALLER, timeout=900)
    (tmp_path / "job.log").write_text(submit.stdout + submit.stderr)
    logs = submit.stdout[-4000:] + submit.stderr[-4000:]
    job = _api(ray_cluster, "/api/jobs/hftlab-smoke")
    assert job["status"] == "SUCCEEDED", f"{job}\n--- ray job submit:\n{logs}"
    assert submit.returncode == 0, logs
    assert "warning: output_dir" not in logs
    assert "(run pid=" in logs, "the pipeline runs as a Ray task on a worker, not in the driver"

    # checkpoints and results on the shared storage path, as safetensors
    outputs = storage / "outputs"
    stages = [p for p in outputs.iterdir() if p.name.startswith(("align-", "finetune-"))]
    assert sorted(p.name.split("-")[0] for p in stages) == ["align", "finetune"], sorted(p.name for p in outputs.iterdir())
    assert all((p / "model.safetensors").is_file() for p in stages), "each stage's weights as safetensors"
    assert not [p for p in outputs.rglob("*") if p.suffix in (".bin", ".pth", ".pkl")], "no pickled weights"

    # the run, on the tracking server named only by the runtime env
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=local_mlflow)
    experiment = client.get_experiment_by_name("smoke")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.info.run_id in logs
    for stage in ("base", "aligned", "finetuned"):
        assert 0.0 <= run.data.metrics[f"{stage}.hs"] <= 100.0
        assert 0.0 <= run.data.metrics[f"{stage}.fa"] <= 100.0
    assert run.data.params["output_dir"] == str(outputs)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config", "model"}



def test_sweep_job_places_trials_on_both_nodes_sharing_one_aligned_model(ray_cluster: dict, local_mlflow: str,
                                                                         tmp_path: Path, tiny_cache: Path) -> None:
    """`ray job submit` of jobs/sweep.py on tests/data/two-node-sweep.yaml: two trials, forced onto worker1 and
    worker2 by `resources.custom`, need the same aligned model; it is trained once and reused from the storage path.

    The storage path is a tmp dir every node of this one-machine cluster reads and writes: it stands for the shared
    mount (the hftlab-shared PVC) of a real cluster. Evidence that the alignment ran once: one align-* stage
    directory, only one trial's MLflow run has `align.train_seconds` (logged only by the trial that trains the stage:
    stages.train_stage returns before it when it reuses one), and the job log has one "[align] reusing".
    """
    storage = tmp_path / "shared"
    runtime_env = yaml.safe_load((REPO / "infra" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"].update(MLFLOW_TRACKING_URI=local_mlflow, HFTLAB_STORAGE_PATH=str(storage),
                                   HFTLAB_CACHE=str(tiny_cache), HF_HOME=str(tmp_path / "hf"))
    env_file = tmp_path / "runtime_env.yaml"
    env_file.write_text(yaml.safe_dump(runtime_env))

    submit = _ray(ray_cluster, "job", "submit", "--submission-id", "hftlab-two-node-sweep", "--working-dir", ".",
                  "--runtime-env", str(env_file), "--", "python", "jobs/sweep.py", "--sweep",
                  "tests/data/two-node-sweep.yaml", timeout=900)
    (tmp_path / "job.log").write_text(submit.stdout + submit.stderr)
    logs = submit.stdout + submit.stderr
    job = _api(ray_cluster, "/api/jobs/hftlab-two-node-sweep")
    assert job["status"] == "SUCCEEDED", f"{job}\n--- ray job submit:\n{logs[-6000:]}"
    assert submit.returncode == 0, logs[-6000:]
    assert "warning: no node of this cluster has" not in logs

    # one aligned model on the shared storage, two fine-tuned ones (the poison ratios differ)
    outputs = storage / "outputs"
    stages = sorted(p.name.split("-")[0] for p in outputs.iterdir() if p.name.startswith(("align-", "finetune-")))
    assert stages == ["align", "finetune", "finetune"], sorted(p.name for p in outputs.iterdir())
    assert not list(outputs.glob(".align-*.tmp-*")), "written once, atomically: no second copy left behind"
    assert logs.count("[align] reusing") == 1, "the second trial reuses the first one's aligned model"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=local_mlflow)
    experiment = client.get_experiment_by_name("two-node-sweep")
    assert experiment is not None
    trials = client.search_runs([experiment.experiment_id], "tags.`hftlab.role` = 'trial'")
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials), [r.info for r in trials]
    for run in trials:
        assert 0.0 <= run.data.metrics["finetuned.hs"] <= 100.0 and 0.0 <= run.data.metrics["finetuned.fa"] <= 100.0
    # each trial on the node its custom resource names; the node ids are those `ray list nodes` reports
    placed = {run.data.params["finetune.poison_ratio"]: run.data.tags["ray.node_id"] for run in trials}
    workers = ray_cluster["workers"]
    assert placed == {"0.0": workers["worker1"], "0.2": workers["worker2"]} and workers["worker1"] != workers["worker2"]
    trained = [run for run in trials if "align.train_seconds" in run.data.metrics]
    assert len(trained) == 1, "exactly one trial trained the shared aligned model"
    assert all("finetune.train_seconds" in run.data.metrics for run in trials)
