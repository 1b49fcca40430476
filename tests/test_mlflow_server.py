"""A tiny pipeline against a real MLflow server on 127.0.0.1, read back through the REST API."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request

import pytest

from hftlab.run.pipeline import run


def rest(url: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", data=data,
                                 headers={"Content-Type": "application/json"}, method="POST" if body else "GET")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


@pytest.mark.slow
def test_pipeline_logs_to_a_real_server_found_via_rest(smoke, mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # honoured when tracking.tracking_uri is null
    cfg = smoke("tracking.tracking_uri=null", "tracking.experiment=server-test", "finetune.n=200", "eval.n_harmful=40")
    summary = run(cfg, log=lambda *_: None)
    assert summary["tracking_uri"] == mlflow_server

    exp = rest(mlflow_server, "experiments/get-by-name?experiment_name=server-test")["experiment"]
    runs = rest(mlflow_server, "runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
    assert [r["info"]["run_id"] for r in runs] == [summary["run_id"]]
    (found,) = runs
    assert found["info"]["status"] == "FINISHED"
    metrics = {m["key"]: m["value"] for m in found["data"]["metrics"]}
    for stage in ("base", "aligned", "finetuned"):
        assert metrics[f"{stage}.hs"] == pytest.approx(summary[stage]["hs"])
        assert metrics[f"{stage}.fa"] == pytest.approx(summary[stage]["fa"])
    params = {p["key"]: p["value"] for p in found["data"]["params"]}
    assert params["finetune.n"] == "200" and params["eval.judge.kind"] == "refusal"

    query = urllib.parse.urlencode({"run_id": summary["run_id"], "path": "model/finetuned"})
    files = {f["path"] for f in rest(mlflow_server, f"artifacts/list?{query}")["files"]}
    assert "model/finetuned/model.safetensors" in files
