"""Dose-response summaries (report/dose_stats.py) and the report's dose section, on hand-made numbers worked out below."""

from __future__ import annotations

import math

import pytest

from hftlab.cli import main
from hftlab.report.dose_stats import auc, compare, paired_bootstrap, welch_p


def test_auc_is_the_mean_height_over_the_range():
    # linear, uneven steps: (0.05 * (0 + 100) / 2 + 0.15 * (100 + 100) / 2) / 0.2 = (2.5 + 15) / 0.2 = 87.5
    assert auc([0.0, 0.05, 0.2], [0.0, 100.0, 100.0]) == pytest.approx(87.5)
    # order does not matter
    assert auc([0.2, 0.0, 0.05], [100.0, 0.0, 100.0]) == pytest.approx(87.5)
    # log axis: 1e-5 -> 1e-4 -> 1e-3 are equal steps, so the area is (0 + 50) / 2 * 1/2 + (50 + 100) / 2 * 1/2 = 50
    assert auc([1e-5, 1e-4, 1e-3], [0.0, 50.0, 100.0], log=True) == pytest.approx(50.0)
    # on a linear axis the same points weigh the last step 10x: (9e-5 * 25 + 9e-4 * 75) / 9.9e-4 = 70.45...
    assert auc([1e-5, 1e-4, 1e-3], [0.0, 50.0, 100.0]) == pytest.approx((9e-5 * 25 + 9e-4 * 75) / 9.9e-4)
    assert auc([3.0], [42.0]) == 42.0
    with pytest.raises(ValueError, match="positive"):
        auc([0.0, 1e-4], [1.0, 2.0], log=True)


def test_welch_p_by_hand():
    # [0, 2] vs [4, 6]: means 1 and 5, sample variances 2 and 2, se = sqrt(2/2 + 2/2) = sqrt(2), t = -4 / sqrt(2) = -2.828,
    # Welch df = (1 + 1)^2 / (1^2 / 1 + 1^2 / 1) = 2; Student's t with 2 df has CDF 1/2 + t / (2 sqrt(2 + t^2)),
    # so p = 1 - |t| / sqrt(2 + t^2) = 1 - sqrt(8 / 10)
    assert welch_p([0.0, 2.0], [4.0, 6.0]) == pytest.approx(1 - math.sqrt(0.8))
    assert math.isnan(welch_p([1.0], [2.0, 3.0]))
    assert welch_p([5.0, 5.0], [5.0, 5.0]) == 1.0 and welch_p([1.0, 1.0], [2.0, 2.0]) == 0.0


def test_bootstrap_interval_and_what_holds():
    assert paired_bootstrap([-3.0, -3.0, -3.0]) == (-3.0, -3.0)
    low, high = paired_bootstrap([-1.0, -2.0, -3.0])
    assert -3.0 <= low < high <= -1.0
    # a clear gap on every seed: Welch p = 1 - ... tiny, interval below 0 -> holds
    clear = compare("vaa", {"0": 10.0, "1": 12.0, "2": 14.0}, "sft", {"0": 50.0, "1": 52.0, "2": 54.0})
    assert clear.mean_diff == pytest.approx(-40.0) and clear.n_paired == 3
    assert clear.welch_p < 1e-3 and clear.ci_high < 0 and clear.holds
    # one seed the other way: the paired interval straddles 0 -> does not hold, whatever the means say
    mixed = compare("vaa", {"0": 0.0, "1": 0.0, "2": 60.0}, "sft", {"0": 30.0, "1": 30.0, "2": 30.0})
    assert mixed.mean_diff == pytest.approx(-10.0) and mixed.ci_low < 0 < mixed.ci_high and not mixed.holds


def test_report_draws_curves_areas_and_tests(tmp_path):
    """Hand-made runs in a real MLflow store: two methods x lr {1e-5, 1e-4} (log axis: area = the mean of the two
    HS values) x 3 seeds; the dose table, the tests and the PNG come out of `hftlab report`."""
    import mlflow

    from hftlab.tracking import client as tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = tracking.start_parent(uri, "dose", "dose", tags={"hftlab.role": "sweep"}, params={})
    client = mlflow.MlflowClient(uri)
    exp = tracking.experiment_id(uri, "dose")
    hs = {  # (label, seed) -> HS at lr 1e-5, 1e-4; areas: sft 50, 55, 60 (55 ± 4.08); vaa 10, 15, 20 (15 ± 4.08)
        ("sft", 0): (20.0, 80.0), ("sft", 1): (30.0, 80.0), ("sft", 2): (40.0, 80.0),
        ("vaa", 0): (0.0, 20.0), ("vaa", 1): (0.0, 30.0), ("vaa", 2): (0.0, 40.0),
    }
    for (label, seed), values in hs.items():
        for lr, h in zip(("1e-05", "0.0001"), values, strict=True):
            run = client.create_run(exp, tags={"mlflow.parentRunId": parent})
            for k, v in {"label": label, "seed": str(seed), "finetune.lr": lr, "align.method": label,
                         "finetune.method": "sft"}.items():
                client.log_param(run.info.run_id, k, v)
            for k, v in {"finetuned.hs": h, "finetuned.fa": 90.0, "aligned.hs": 1.0}.items():
                client.log_metric(run.info.run_id, k, v)
            if label == "vaa":
                client.log_metric(run.info.run_id, "align.final_q_1", 0.6)
            client.set_terminated(run.info.run_id, "FINISHED")
    tracking.set_status(uri, parent, "FINISHED")
    out = tmp_path / "report"
    assert main(["report", "dose", "--tracking-uri", uri, "--out", str(out)]) == 0
    md = (out / "dose-lr.md").read_text().splitlines()
    # rows ordered by HS area; columns: units, HS area, FA area, HS at each lr, aligned HS, q
    assert "| vaa | 3 | 15.0 ± 4.1 | 90.0 ± 0.0 | 0.0 ± 0.0 | 30.0 ± 8.2 | 1.0 ± 0.0 | 0.6 ± 0.0 |" in md
    assert "| sft | 3 | 55.0 ± 4.1 | 90.0 ± 0.0 | 30.0 ± 8.2 | 80.0 ± 0.0 | 1.0 ± 0.0 | - |" in md
    # sft - vaa = +40 on every seed: the interval is [40, 40]; Welch on equal spreads 40 / sqrt(2 * 25 / 3)
    row = next(line for line in md if line.startswith("| sft | vaa |"))
    assert "+40.0" in row and "[+40.0, +40.0]" in row and "| 3 | **holds** |" in row
    assert (out / "dose-lr.png").stat().st_size > 5000
    report = (out / "report.md").read_text()
    assert "## dose response over lr" in report
    assert "Machine: not recorded. Commit: not recorded. Wall time:" in report  # hand-made runs carry no such tags


def test_report_of_one_setting_over_seeds_still_tests_the_methods(tmp_path):
    """No axis varies (one task, one lr), several seeds: the report adds the per-method stats and pairwise tests."""
    import mlflow

    from hftlab.tracking import client as tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = tracking.start_parent(uri, "abl", "abl", tags={"hftlab.role": "sweep"}, params={})
    client = mlflow.MlflowClient(uri)
    for label, values in {"vaa": (10.0, 20.0, 30.0), "one-group": (50.0, 60.0, 70.0)}.items():
        for seed, h in enumerate(values):
            run = client.create_run(tracking.experiment_id(uri, "abl"), tags={"mlflow.parentRunId": parent})
            for k, v in {"label": label, "seed": str(seed), "finetune.lr": "4e-05", "finetune.task": "sst2"}.items():
                client.log_param(run.info.run_id, k, v)
            client.log_metric(run.info.run_id, "finetuned.hs", h)
            client.log_metric(run.info.run_id, "finetuned.fa", 90.0)
            client.set_terminated(run.info.run_id, "FINISHED")
    out = tmp_path / "report"
    assert main(["report", "abl", "--tracking-uri", uri, "--out", str(out)]) == 0
    md = (out / "seeds.md").read_text()
    assert md.startswith("HS (%) at finetune.lr=4e-05")
    assert "| vaa | 3 | 20.0 ± 8.2 | 90.0 ± 0.0 | 20.0 ± 8.2 | - | - |" in md
    # one-group - vaa = +40 on every seed
    assert "| one-group | vaa | +40.0 |" in md and "[+40.0, +40.0] | 3 | **holds** |" in md
