"""VAA stage 1: ForgotNum by hand, and the real Ray Data matrix on the toy world."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch

from hftlab.groups.vulnerability import aggregate, agreement, auroc, by_loss, forgot_num, overlap


def hand_matrix() -> pd.DataFrame:
    # ids a..d over checkpoints 0..2: a forgets at t=1 and t=2, b at t=2 only, c never, d was harmful already
    hs = {"a": [0, 1, 1], "b": [0, 0, 1], "c": [0, 0, 0], "d": [1, 1, 0]}
    loss = {"a": [1.0, 2.0, 3.0], "b": [1.0, 1.5, 1.2], "c": [1.0, 0.9, 1.1], "d": [2.0, 2.0, 2.0]}
    return pd.DataFrame([{"id": i, "checkpoint": t, "hs": hs[i][t], "loss": loss[i][t]} for i in hs for t in range(3)])


def test_forgot_num_by_hand():
    f = forgot_num(hand_matrix())
    assert f["forgot_num"].to_dict() == {"a": 2, "b": 1, "c": 0, "d": 0}
    assert f["hs0"].to_dict() == {"a": 0, "b": 0, "c": 0, "d": 1}
    assert f["score"].to_dict() == pytest.approx({"a": 2.0, "b": 0.5, "c": 0.1, "d": 0.0})


def test_multi_proxy_rules():
    one = forgot_num(hand_matrix())
    other = one.copy()
    other["forgot_num"] = pd.Series({"a": 0, "b": 3, "c": 1, "d": 0})
    any_rule = aggregate([one, other], "any")
    assert any_rule["group"].to_dict() == {"a": 1, "b": 1, "c": 1, "d": 0}
    both = aggregate([one, other], "at_least", at_least=2)
    assert both["group"].to_dict() == {"a": 0, "b": 1, "c": 0, "d": 0}
    assert both["forgot_num"].to_dict() == {"a": 2, "b": 4, "c": 1, "d": 0}
    o = overlap(one, other)
    assert (o["forgot_a"], o["forgot_b"], o["common"]) == (2, 2, 1) and o["jaccard"] == pytest.approx(1 / 3)


def test_loss_grouping_by_hand_and_its_config_checks(smoke):
    from hftlab.config import ConfigError

    one = forgot_num(hand_matrix())  # scores a 2.0, b 0.5, c 0.1, d 0.0
    other = one.assign(score=pd.Series({"a": 0.0, "b": 0.5, "c": 0.5, "d": 0.1}))
    g = by_loss([one, other], share=0.5)  # mean scores a 1.0, b 0.5, c 0.3, d 0.05: the top half is a, b
    assert g["group"].to_dict() == {"a": 1, "b": 1, "c": 0, "d": 0}
    assert g["score"].to_dict() == pytest.approx({"a": 1.0, "b": 0.5, "c": 0.3, "d": 0.05})
    tied = by_loss([one.assign(score=1.0)], share=0.25)  # all equal: taken in id order
    assert tied["group"].to_dict() == {"a": 1, "b": 0, "c": 0, "d": 0}
    for bad, field in (("groups.loss_share=1.5", "groups.loss_share"), ("groups.method=ppl", "groups.method")):
        with pytest.raises(ConfigError, match=field):
            smoke(bad)
    with pytest.raises(ConfigError, match="groups.loss_score"):
        smoke("groups.method=loss", "groups.loss_score=false")


def test_length_sorted_loss_batches_give_each_rows_own_loss(smoke):
    """Batched by length, each row's loss is still its own, in the caller's order: equal to one row at a time."""
    from hftlab.data.toyworld import build_world
    from hftlab.groups.matrix import response_losses
    from hftlab.models.loading import load_model
    from hftlab.run.pipeline import base_model

    cfg = smoke()
    model, tok = load_model(base_model(cfg, log=lambda *_: None))
    world = build_world(cfg.data.toy)
    pairs = [(a.prompt, a.response * (1 + k % 3)) for k, a in enumerate(world.alignment[:12])]  # lengths differ
    kw = dict(template=cfg.data.template, max_length=cfg.base.max_length)
    alone = [response_losses(model, tok, [pair], **kw)[0] for pair in pairs]
    assert response_losses(model, tok, pairs, batch_size=5, **kw) == pytest.approx(alone, rel=1e-4, abs=1e-5)


def test_auroc_and_agreement_by_hand():
    assert auroc(np.array([3.0, 2.0, 1.0, 0.0]), np.array([True, True, False, False])) == 1.0
    assert auroc(np.array([0.0, 1.0]), np.array([True, False])) == 0.0
    assert auroc(np.array([1.0, 1.0]), np.array([True, False])) == 0.5
    g = aggregate([forgot_num(hand_matrix())])
    assert agreement(g)["score_auroc"] == 1.0  # a, b (forgotten) score above c, d


@pytest.mark.slow
def test_groups_on_the_toy_world(smoke, ray_local, tmp_path):
    from hftlab.groups.stage import run_groups

    cfg = smoke()
    summary = run_groups(cfg, log=lambda *_: None)
    groups = pd.read_json(summary["group_file"], lines=True).set_index("id")
    n_ex = len(groups)
    assert n_ex == 14 * 40  # the smoke world's alignment set
    # the matrix: every (checkpoint, example) once; ForgotNum recomputed from it equals the group file
    matrix = pd.read_parquet(f"{summary['path']}/matrix.parquet")
    assert set(matrix["proxy"]) == {0}
    n_ckpt = matrix["checkpoint"].nunique()
    assert n_ckpt == 1 + cfg.groups.proxies[0].epochs
    assert len(matrix) == n_ex * n_ckpt and not matrix.duplicated(["id", "checkpoint"]).any()
    hs = matrix.pivot(index="id", columns="checkpoint", values="hs")
    by_hand = sum((hs[t] > hs[0]).astype(int) for t in range(1, n_ckpt))
    assert (groups["forgot_num"] == by_hand.reindex(groups.index)).all()
    assert ((groups["forgot_num"] > 0).astype(int) == groups["group"]).all()
    # non-trivial groups at this seed (measured: 89 of 560 vulnerable)
    assert 0 < groups["group"].sum() < n_ex
    for name in ("forgot_num_hist.png", "category_vulnerability.png", "summary.json"):
        assert (summary["path"] and os.path.getsize(f"{summary['path']}/{name}") > 0)
    again = run_groups(cfg, log=lambda *_: None)  # finished stages are reused, results identical
    assert again["path"] == summary["path"] and again["n_vulnerable"] == summary["n_vulnerable"]

    # groups.method=loss: the same proxy checkpoints, scored without generating or judging: a judge that cannot load
    # (a broken model) is never loaded, the proxy is reused, and the score equals the generated matrix's loss score
    broken = tmp_path / "broken-judge"  # passes the plan's check (a model directory) but loads no model
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    logs: list[str] = []
    by_loss = run_groups(smoke("groups.method=loss", "groups.loss_share=0.25", "eval.judge.kind=moderation",
                               f"eval.judge.model={broken}"), log=logs.append)
    assert by_loss["path"] != summary["path"] and by_loss["method"] == "loss"
    assert any(line.startswith("[proxy] reusing") for line in logs)
    loss_matrix = pd.read_parquet(f"{by_loss['path']}/matrix.parquet")
    assert len(loss_matrix) == len(matrix) and (loss_matrix["hs"] == -1).all() and (loss_matrix["answer"] == "").all()
    loss_groups = pd.read_json(by_loss["group_file"], lines=True).set_index("id").reindex(groups.index)
    assert np.allclose(loss_groups["score"], groups["score"], atol=1e-4)
    vulnerable = loss_groups["group"] == 1
    assert vulnerable.sum() == round(0.25 * n_ex) == by_loss["n_vulnerable"]
    assert loss_groups.loc[vulnerable, "score"].min() >= loss_groups.loc[~vulnerable, "score"].max()
    assert os.path.getsize(f"{by_loss['path']}/loss_score_hist.png") > 0


@pytest.mark.slow
def test_killing_a_matrix_actor_loses_and_duplicates_no_row(smoke, ray_local, tmp_path):
    from ray.util.state import list_actors

    from hftlab.data.toyworld import build_world
    from hftlab.groups.matrix import build_matrix
    from hftlab.run.pipeline import base_model

    cfg = smoke("groups.batch_size=8", "groups.actors=2")
    base = base_model(cfg, log=lambda *_: None)
    examples = build_world(cfg.data.toy).alignment[:240]
    # two proxy runs sharing checkpoint 0, as in the stage; copies, so each is a distinct model to answer
    a, b, c = (str(shutil.copytree(base, tmp_path / name)) for name in "abc")
    runs = [[a, b], [a, c]]
    killed: list[int] = []
    errors: list[BaseException] = []
    address = ray_local.get_runtime_context().gcs_address  # this session's cluster, even if others run

    def kill_one_busy_actor() -> None:
        try:
            find_and_kill()
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    def find_and_kill() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            alive = [a for a in list_actors(address=address, filters=[("state", "=", "ALIVE")], detail=True)
                     if "MatrixWorker" in a.class_name and a.pid]
            if len(alive) == 2:
                time.sleep(2.0)  # let both actors get into their batches
                os.kill(alive[0].pid, signal.SIGKILL)
                killed.append(alive[0].pid)
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_one_busy_actor, daemon=True)
    killer.start()
    matrix = build_matrix(cfg, examples, runs, tmp_path / "matrix.parquet")
    killer.join(timeout=5)
    assert killed, f"the test never found a running matrix actor to kill ({errors})"
    expected = {(k, t, e.id) for k in range(2) for t in range(2) for e in examples}
    got = list(zip(matrix["proxy"], matrix["checkpoint"], matrix["id"], strict=True))
    assert len(got) == len(expected) and set(got) == expected  # none lost, none duplicated
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "matrix.parquet"), matrix, check_dtype=False)  # the whole matrix
    # all three models are copies of one: retried rows must carry the same answers as the others
    answers = matrix.pivot(index="id", columns=["proxy", "checkpoint"], values="answer")
    assert all((answers[col] == answers[(0, 0)]).all() for col in answers.columns)
    assert set(matrix["hs"].unique()) <= {0, 1} and (matrix["answer"].str.len() > 0).all()


def test_a_proxy_killed_mid_way_resumes_to_an_uninterrupted_proxys_checkpoints(smoke, tmp_path, monkeypatch):
    """VAA's proxy fine-tuning resumes like a training stage: its saved checkpoints kept, the rest bit for bit."""
    from dataclasses import replace

    from safetensors.torch import load_file

    from hftlab.groups.proxy import run_proxy
    from hftlab.run.inputs import plan
    from hftlab.run.stages import base_model, train_stage
    from hftlab.tracking.logger import Tracker
    from hftlab.training.checkpoint import Checkpoint

    cfg = smoke("tracking.enabled=false")
    p = plan(cfg, proxies=True)
    aligned = train_stage(cfg, "align", base_model(cfg), p.align_pairs, Tracker(cfg), lambda _: None)
    proxy = cfg.groups.proxies[0]
    args = (proxy, aligned, p.proxy_tasks[proxy.task], p.harmful)
    reference = run_proxy(replace(cfg, output_dir=str(tmp_path / "uninterrupted")), *args, log=lambda _: None)
    assert len(reference) == 1 + proxy.epochs

    save = Checkpoint.maybe_save
    saves: list[int] = []

    def save_then_crash(self, step, *rest):
        save(self, step, *rest)
        if self.directory.name.startswith(".ckpt-proxy-") and (self.directory / f"step-{step:07d}").is_dir():
            saves.append(step)
            if len(saves) == 2:
                raise KeyboardInterrupt  # stands for the kill: nothing below it catches it

    monkeypatch.setattr(Checkpoint, "maybe_save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_proxy(cfg, *args, log=lambda _: None)
    out = tmp_path / "outputs"
    assert not list(out.glob("proxy-*"))  # nothing half-trained reads as finished
    (partial,) = out.glob(".partial-proxy-*")
    assert sorted(d.name for d in partial.iterdir()) == ["ckpt-1", "ckpt-2"]
    kept = (partial / "ckpt-1" / "model.safetensors").stat().st_mtime_ns

    monkeypatch.setattr(Checkpoint, "maybe_save", save)
    logs: list[str] = []
    resumed = run_proxy(cfg, *args, log=logs.append)
    assert any(f"continuing from step {saves[1]}" in x for x in logs), logs
    assert not list(out.glob(".partial-proxy-*")) and not list(out.glob(".ckpt-proxy-*"))
    assert (out / resumed[1].split("/")[-2] / "ckpt-1" / "model.safetensors").stat().st_mtime_ns == kept
    for ours, theirs in zip(resumed[1:], reference[1:], strict=True):
        a, b = load_file(f"{ours}/model.safetensors"), load_file(f"{theirs}/model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (ours, theirs)


@pytest.mark.slow
def test_a_matrix_stopped_mid_way_answers_only_the_missing_rows_on_rerun(smoke, ray_local, tmp_path, monkeypatch):
    """The driver stops after 3 batches (a kill, for the matrix); the rerun takes those rows from the journal."""
    import ray.data

    from hftlab.data.toyworld import build_world
    from hftlab.groups.matrix import build_matrix
    from hftlab.run.pipeline import base_model

    cfg = smoke("groups.batch_size=8", "groups.actors=1")
    base = base_model(cfg, log=lambda *_: None)
    examples = build_world(cfg.data.toy).alignment[:64]
    runs = [[base, str(shutil.copytree(base, tmp_path / "ckpt-1"))]]
    journal = tmp_path / ".matrix.jsonl"
    iterate = ray.data.Dataset.iter_batches

    def stop_after_three(self, *args, **kwargs):
        for n, batch in enumerate(iterate(self, *args, **kwargs)):
            if n == 3:
                raise KeyboardInterrupt  # stands for the kill
            yield batch

    monkeypatch.setattr(ray.data.Dataset, "iter_batches", stop_after_three)
    with pytest.raises(KeyboardInterrupt):
        build_matrix(cfg, examples, runs, tmp_path / "matrix.parquet", journal=journal, log=lambda _: None)
    assert not (tmp_path / "matrix.parquet").exists()
    with journal.open("a") as fh:
        fh.write('{"id": "cut mid-')  # the kill can land mid-line too
    taken = len(journal.read_text().splitlines()) - 1
    assert taken == 3 * 8

    monkeypatch.setattr(ray.data.Dataset, "iter_batches", iterate)
    logs: list[str] = []
    matrix = build_matrix(cfg, examples, runs, tmp_path / "matrix.parquet", journal=journal, log=logs.append)
    assert f"[groups] matrix: {taken} rows taken up from {journal}, {2 * 64 - taken} to answer" in logs
    got = list(zip(matrix["checkpoint"], matrix["id"], strict=True))
    assert len(got) == 2 * 64 and set(got) == {(t, e.id) for t in range(2) for e in examples}  # none lost, none twice
    assert not journal.exists() and str(matrix["hs"].dtype) == "int8"
