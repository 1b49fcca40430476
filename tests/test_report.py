"""`hftlab report`: paper-style cells from runs with known metrics, computed by hand.

The runs are real MLflow runs in a local SQLite store, logged here with chosen values (no training),
so every cell, std and bold mark below is worked out in the comments.
"""

from __future__ import annotations

import csv

import mlflow
import pytest

from hftlab.cli import main
from hftlab.tracking import client as tracking


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    """One SQLite store for this module (creating one costs seconds); each test uses its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('report-store') / 'mlflow.db'}"


def sweep_with(uri: str, experiment: str, name: str, runs: list[tuple[dict, float, float]], status: str = "FINISHED") -> str:
    """A parent run tagged as a sweep, and one child per (params, HS, FA)."""
    parent = tracking.start_parent(uri, experiment, name, tags={"hftlab.role": "sweep", "hftlab.sweep": name}, params={})
    client = mlflow.MlflowClient(uri)
    exp_id = tracking.experiment_id(uri, experiment)
    for i, (params, hs, fa) in enumerate(runs):
        run = client.create_run(exp_id, run_name=f"{name}-{i}", tags={"mlflow.parentRunId": parent})
        defaults = {"finetune.task": "sst2", "finetune.epochs": "3", "output_dir": f"/tmp/out-{i}", "seed": "0"}
        for key, value in {**defaults, **params}.items():
            client.log_param(run.info.run_id, key, value)
        client.log_metric(run.info.run_id, "finetuned.hs", hs)
        client.log_metric(run.info.run_id, "finetuned.fa", fa)
        client.set_terminated(run.info.run_id, status)
    tracking.set_status(uri, parent, "FINISHED")
    return parent


def sft(p: str, seed: int) -> dict:
    return {"align.method": "sft", "finetune.method": "sft", "finetune.poison_ratio": p, "seed": str(seed)}


def vaa(p: str, seed: int) -> dict:
    return {**sft(p, seed), "align.method": "vaa"}


def test_report_cells_are_mean_std_over_seeds_with_the_best_marked(tmp_path, uri):
    # an older sweep in the same experiment: the report reads only the latest one unless --parent names it
    old = sweep_with(uri, "exp", "old", [(sft("0.1", 0), 99.0, 1.0)])
    parent = sweep_with(uri, "exp", "new", [
        (sft("0.1", 0), 40.0, 90.0), (sft("0.1", 1), 60.0, 92.0),  # HS 50.0 ± 10.0, FA 91.0 ± 1.0
        (vaa("0.1", 0), 10.0, 88.0), (vaa("0.1", 1), 20.0, 90.0),  # HS 15.0 ± 5.0,  FA 89.0 ± 1.0
        (sft("0.2", 0), 80.0, 95.0), (sft("0.2", 1), 80.0, 95.0),  # HS 80.0 ± 0.0,  FA 95.0 ± 0.0
        (vaa("0.2", 0), 30.0, 93.0), (vaa("0.2", 1), 50.0, 97.0),  # HS 40.0 ± 10.0, FA 95.0 ± 2.0 (FA tie: both bold)
    ])
    # a killed trial of the new sweep never counts
    client = mlflow.MlflowClient(uri)
    killed = client.create_run(tracking.experiment_id(uri, "exp"), tags={"mlflow.parentRunId": parent})
    client.log_param(killed.info.run_id, "finetune.poison_ratio", "0.1")
    client.log_metric(killed.info.run_id, "finetuned.hs", 0.0)
    client.set_terminated(killed.info.run_id, "KILLED")

    out = tmp_path / "report"
    assert main(["report", "exp", "--tracking-uri", uri, "--out", str(out)]) == 0
    md = (out / "table-p.md").read_text().splitlines()
    assert "| method | p=0.1 HS | p=0.1 FA | p=0.2 HS | p=0.2 FA | Avg HS | Avg FA |" in md
    # Avg: sft HS (50 + 80) / 2 = 65.0, FA (91 + 95) / 2 = 93.0; vaa HS 27.5, FA 92.0
    assert "| sft+sft | 50.0 ± 10.0 | **91.0 ± 1.0** | 80.0 ± 0.0 | **95.0 ± 0.0** | 65.0 | **93.0** |" in md
    assert "| vaa+sft | **15.0 ± 5.0** | 89.0 ± 1.0 | **40.0 ± 10.0** | **95.0 ± 2.0** | **27.5** | 92.0 |" in md

    rows = {(r["method"], r["column"]): r for r in csv.DictReader(open(out / "table-p.csv"))}
    assert set(rows) == {("sft+sft", "0.1"), ("sft+sft", "0.2"), ("vaa+sft", "0.1"), ("vaa+sft", "0.2")}
    cell = rows[("vaa+sft", "0.2")]
    assert [float(cell[k]) for k in ("hs_mean", "hs_std", "fa_mean", "fa_std")] == [40.0, 10.0, 95.0, 2.0]
    assert (cell["n"], cell["hs_best"], cell["fa_best"]) == ("2", "1", "1")
    assert (out / "hs-vs-p.png").stat().st_size > 5000
    assert not (out / "table-epochs.md").exists()  # epochs did not vary: no such layout

    # the same files are artifacts of the sweep's parent run
    arts = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/report.md", "report/table-p.md", "report/table-p.csv", "report/hs-vs-p.png"} <= arts

    # --parent picks another sweep; with one task and one p, the layout is methods x tasks
    assert main(["report", "exp", "--tracking-uri", uri, "--out", str(tmp_path / "old"), "--parent", old]) == 0
    assert "| sft+sft | **99.0 ± 0.0** | **1.0 ± 0.0** |" in (tmp_path / "old" / "table-task.md").read_text()


def test_rows_split_by_other_swept_params_and_epochs_layout(tmp_path, uri):
    runs = []
    for lam, base in (("0.5", 30.0), ("1.0", 10.0)):
        for epochs, extra in (("1", 0.0), ("5", 20.0)):
            for seed, noise in ((0, -2.0), (1, 2.0)):
                params = {**vaa("0.1", seed), "align.vaa.lam": lam, "finetune.epochs": epochs}
                runs.append((params, base + extra + noise, 90.0))
    sweep_with(uri, "lam", "lam", runs)
    out = tmp_path / "r"
    assert main(["report", "lam", "--tracking-uri", uri, "--out", str(out)]) == 0
    md = (out / "table-epochs.md").read_text()
    # rows keep lam apart (it varies and is not the seed); HS e.g. lam=1.0, 5 epochs: (28 + 32) / 2 = 30 ± 2
    assert "| vaa+sft lam=0.5 | 30.0 ± 2.0 | **90.0 ± 0.0** | 50.0 ± 2.0 | **90.0 ± 0.0** | 40.0 | **90.0** |" in md
    assert "| vaa+sft lam=1.0 | **10.0 ± 2.0** | **90.0 ± 0.0** | **30.0 ± 2.0** | **90.0 ± 0.0** | **20.0** | **90.0** |" in md
    assert (out / "hs-vs-epochs.png").is_file()


def test_report_of_an_unknown_experiment_fails_clearly(uri, capsys):
    assert main(["report", "nope", "--tracking-uri", uri]) == 2
    assert "has no finished runs with finetuned.hs" in capsys.readouterr().err


def test_top_level_runs_count_when_no_sweep_exists(tmp_path, uri):
    client = mlflow.MlflowClient(uri)
    exp_id = tracking.ensure_experiment(uri, "plain")
    for seed, hs in ((0, 10.0), (1, 30.0)):
        run = client.create_run(exp_id)
        for key, value in {**sft("0.1", seed), "finetune.task": "sst2", "finetune.epochs": "3"}.items():
            client.log_param(run.info.run_id, key, value)
        client.log_metric(run.info.run_id, "finetuned.hs", hs)
        client.log_metric(run.info.run_id, "finetuned.fa", 50.0)
        client.set_terminated(run.info.run_id)
    assert main(["report", "plain", "--tracking-uri", uri, "--out", str(tmp_path / "o")]) == 0
    assert "| sft+sft | **20.0 ± 10.0** | **50.0 ± 0.0** |" in (tmp_path / "o" / "table-task.md").read_text()
    # with no parent, the report is logged to a run of its own
    reports = tracking.search_runs(uri, "plain", "tags.`hftlab.role` = 'report'")
    assert len(reports) == 1 and reports[0]["status"] == "FINISHED"


def test_report_gives_the_paired_difference_against_sft_with_the_power_line(tmp_path, uri):
    import json

    parent = sweep_with(uri, "paired", "p", [(sft("0.1", 0), 50.0, 90.0), (sft("0.1", 1), 25.0, 90.0),
                                             (vaa("0.1", 0), 25.0, 90.0), (vaa("0.1", 1), 0.0, 90.0)])
    client = mlflow.MlflowClient(uri)
    verdicts = {("sft", "0"): [1, 1, 0, 0], ("sft", "1"): [1, 0, 0, 0],
                ("vaa", "0"): [1, 0, 0, 0], ("vaa", "1"): [0, 0, 0, 0]}
    for run in tracking.children(uri, "paired", parent):
        client.log_text(run["run_id"], json.dumps(verdicts[(run["params"]["align.method"], run["params"]["seed"])]),
                        "verdicts/finetuned.json")
        client.log_metric(run["run_id"], "judge.sensitivity", 0.9)
        client.log_metric(run["run_id"], "judge.specificity", 0.8)
    out = tmp_path / "report"
    assert main(["report", "paired", "--tracking-uri", uri, "--out", str(out)]) == 0
    text = (out / "paired-task.md").read_text()
    (line,) = [row for row in text.splitlines() if row.startswith("| sst2 | vaa+sft")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    # VAA's HS per seed 25 and 0 (12.5), SFT's 50 and 25 (37.5); paired over 2 seeds x 4 prompts: (1 + 1) fewer of 8 =
    # -25 points
    assert cells[2:5] == ["12.5", "37.5", "-25.0"]
    lo, hi = (float(x) for x in cells[5].strip("[]").split(","))
    assert lo <= -25.0 <= hi and hi <= 0.0  # every resample has VAA at or below SFT: no prompt is worse under VAA
    assert cells[6] == "2 x 4"
    # detectable: (1.960 + 0.842) sqrt(2 p (1 - p) / (4 x 2)) / (0.9 + 0.8 - 1), p = mean(25, 0, 50, 25) / 100 = 0.25
    assert float(cells[7]) == pytest.approx(86.7, abs=0.1)
    assert "## paired differences over task" in (out / "report.md").read_text()
