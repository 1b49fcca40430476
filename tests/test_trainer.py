"""Ray Train with 2 CPU workers (DDP over gloo) gives the same weights as 1 worker: SFT, VAA, SafeGrad, Vaccine,
Booster, RepNoise, Lisa; DeepSpeed ZeRO-2; and a crashed run resumes to the unbroken run's weights.

The 1-worker reference is the same worker loop run in this process (training/worker.train_local: a world of one, no
worker group to start, ~20 s less per comparison); ZeRO needs its ranks, so its reference is 1 Ray Train worker."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from hftlab.data.toyworld import build_world
from hftlab.faults import CrashOnce
from hftlab.run.pipeline import base_model
from hftlab.training.trainer import train_distributed
from hftlab.training.worker import train_local


def weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def assert_same_trajectory(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float, lr: float, steps: int) -> None:
    """Close within rtol/atol but for at most 1 weight in 10,000, and those within the Adam steps' reach (lr a step).
    Adam turns reduction-order noise on a ~0 gradient (a rare token's embedding) into a +-lr update: on an AVX2 CPU
    one weight of VAA's 24,576 ends 5e-5 to 5e-4 apart between paths (measured at 8caa720 too)."""
    close = torch.isclose(got, want, rtol=rtol, atol=atol)
    assert int((~close).sum()) <= max(1, got.numel() // 10_000), f"{int((~close).sum())} of {got.numel()} weights apart"
    assert float((got - want).abs().max()) <= lr * steps


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "vaa"])
def test_two_workers_match_one_worker(smoke, ray_local, tmp_path, method):
    cfg = smoke(f"align.method={method}", "align.epochs=1", "align.batch_size=16", "align.lr=1e-3", "align.vaa.rho=0.3",
                "align.vaa.eta_q=0.5")
    base = base_model(cfg, log=lambda *_: None)
    world = build_world(cfg.data.toy)
    pairs = [(a.prompt, a.response) for a in world.alignment[:96]]
    groups = [i % 3 == 0 for i in range(len(pairs))] if method == "vaa" else None
    groups = [int(g) for g in groups] if groups else None
    common = dict(seed=0, template=cfg.data.template, max_length=cfg.base.max_length, groups=groups)
    metrics = {1: train_local(cfg.align, base, pairs, tmp_path / "w1", **common),  # 1 worker, in this process
               2: train_distributed(cfg.align, base, pairs, tmp_path / "w2", workers=2,
                                    storage_path=str(tmp_path / "ray"), **common)}
    assert [(m["steps"], m["world_size"]) for m in metrics.values()] == [(6, 1), (6, 2)]
    one, two, start = weights(tmp_path / "w1"), weights(tmp_path / "w2"), weights(type(tmp_path)(base))
    moved = max((one[k] - start[k]).abs().max().item() for k in one)
    assert moved > 1e-3  # training really changed the weights
    for k in one:
        assert_same_trajectory(two[k], one[k], rtol=1e-4, atol=2e-5, lr=1e-3, steps=6)

    # and the in-process path (workers=1, no Ray) follows the same trajectory
    from hftlab.models.loading import load_model
    from hftlab.training.grouped import train_vaa
    from hftlab.training.loop import train

    model, tok = load_model(base)
    common = dict(template=cfg.data.template, epochs=1, lr=1e-3, batch_size=16, seed=0, max_length=cfg.base.max_length)
    if method == "vaa":
        train_vaa(model, tok, pairs, groups, cfg.align.vaa, **common)
    else:
        train(model, tok, pairs, **common)
    local = {k: v.detach() for k, v in model.state_dict().items()}
    for k in one:  # HF's mean loss vs our token sum reduce in another order; Adam magnifies that on ~0 gradients
        assert_same_trajectory(local[k], one[k], rtol=1e-3, atol=1e-4, lr=1e-3, steps=6)


@pytest.mark.slow
def test_pipeline_aligns_on_two_ray_train_workers(smoke, ray_local):
    from hftlab.run.pipeline import run

    summary = run(smoke("align.workers=2", "finetune.workers=2", "finetune.n=300"), log=lambda *_: None)
    assert summary["base"]["hs"] >= 80.0 and summary["aligned"]["hs"] <= 20.0
    assert summary["finetuned"]["hs"] >= summary["aligned"]["hs"] + 50.0  # the HFT effect, trained on 2 workers


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "vaa"])
def test_deepspeed_zero2_two_workers_match_one_worker(smoke, ray_local, tmp_path, method):
    cfg = smoke(f"align.method={method}", "align.epochs=1", "align.batch_size=16", "align.lr=1e-3", "align.workers=2",
                "align.zero_stage=2", "align.vaa.rho=0.3", "align.vaa.eta_q=0.5", "align.vaa.lam=0.6",
                "align.vaa.objective=weighted")  # weighted: every step probes, perturbs and sets gradients
    base = base_model(cfg, log=lambda *_: None)
    pairs = [(a.prompt, a.response) for a in build_world(cfg.data.toy).alignment[:96]]
    groups = [int(i % 3 == 0) for i in range(len(pairs))] if method == "vaa" else None
    out = {}
    for workers in (1, 2):
        out[workers] = tmp_path / f"ds{workers}"
        metrics = train_distributed(cfg.align, base, pairs, out[workers], workers=workers, seed=0, template=cfg.data.template,
                                    max_length=cfg.base.max_length, storage_path=str(tmp_path / "ray"), groups=groups)
        assert metrics["steps"] == 6 and metrics["world_size"] == workers
    one, two, start = weights(out[1]), weights(out[2]), weights(type(out[1])(base))
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 1e-3
    for k in one:
        assert_same_trajectory(two[k], one[k], rtol=1e-4, atol=2e-5, lr=1e-3, steps=6)


@pytest.mark.slow
def test_safegrad_two_workers_match_one_worker(smoke, ray_local, tmp_path):
    cfg = smoke("finetune.method=safegrad", "finetune.epochs=1", "finetune.batch_size=16", "finetune.lr=1e-3",
                "finetune.safegrad.align_loss=ce", "finetune.safegrad.mode=per_tensor", "finetune.safegrad.batch_size=8")
    base = base_model(cfg, log=lambda *_: None)
    world = build_world(cfg.data.toy)
    pairs = [(h.prompt, h.response) for h in world.poison[:96]]  # all harmful: conflicts with alignment for sure
    side = [(a.prompt, a.response) for a in world.alignment[:24]]
    common = dict(seed=0, side=side, template=cfg.data.template, max_length=cfg.base.max_length)
    metrics = {1: train_local(cfg.finetune, base, pairs, tmp_path / "sg1", **common),
               2: train_distributed(cfg.finetune, base, pairs, tmp_path / "sg2", workers=2,
                                    storage_path=str(tmp_path / "ray"), **common)}
    assert [(m["steps"], m["world_size"]) for m in metrics.values()] == [(6, 1), (6, 2)]
    one, two = weights(tmp_path / "sg1"), weights(tmp_path / "sg2")
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2])
def test_a_crashed_run_resumes_from_its_checkpoint_exactly(smoke, ray_local, tmp_path, zero_stage):
    """VAA on 2 workers, checkpoint every 2 steps, a worker crashes after step 5: the result equals the unbroken run.
    Under the references' recipe (clipping, weight decay, cosine schedule with warmup): the schedule resumes too.
    ZeRO-2 only: plain DDP's resume, schedule included, is the SafeGrad test below (the same checkpoint code, a crash
    at step 3, the same exact equality); a DDP variant here cost 70-100 s of the suite's 20 minutes."""
    cfg = smoke("align.method=vaa", "align.epochs=1", "align.batch_size=8", "align.lr=1e-3", "align.vaa.rho=0.3",
                "align.vaa.eta_q=0.5", "align.checkpoint_every=2", f"align.zero_stage={zero_stage or 'null'}",
                "align.max_grad_norm=0.5", "align.weight_decay=0.1", "align.lr_scheduler=cosine", "align.warmup_ratio=0.25")
    base = base_model(cfg, log=lambda *_: None)
    pairs = [(a.prompt, a.response) for a in build_world(cfg.data.toy).alignment[:64]]
    groups = [int(i % 3 == 0) for i in range(len(pairs))]
    common = dict(workers=2, seed=0, template=cfg.data.template, max_length=cfg.base.max_length, groups=groups)
    train_distributed(cfg.align, base, pairs, tmp_path / "clean", storage_path=str(tmp_path / "ray"), **common)
    metrics = train_distributed(cfg.align, base, pairs, tmp_path / "crashed", storage_path=str(tmp_path / "ray"),
                                max_failures=1, crash=CrashOnce(5), **common)
    assert metrics["steps"] == 8
    runs = list((tmp_path / "ray" / "train-crashed").glob("checkpoint_*"))
    assert runs, "the crashed run reported checkpoints"
    clean, crashed = weights(tmp_path / "clean"), weights(tmp_path / "crashed")
    for k in clean:
        torch.testing.assert_close(crashed[k], clean[k], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_lora_on_two_workers_matches_one_worker_and_saves_only_the_adapter(smoke, ray_local, tmp_path):
    """The stage's LoRA on Ray Train workers: 2 workers give 1 worker's adapter, and the stage holds the adapter alone."""
    import json

    from hftlab.models.loading import load_model
    from hftlab.models.stage_dir import PARENT_FILE

    cfg = smoke("align.epochs=1", "align.batch_size=16", "align.lr=1e-2", "align.lora.enabled=true", "align.lora.r=4",
                "align.lora.alpha=8", "align.lora.target_modules=[q_proj,v_proj]", "align.workers=2",
                "align.lora.dropout=0")  # dropout masks differ by worker count: off, to compare weights
    base = base_model(cfg, log=lambda *_: None)
    pairs = [(a.prompt, a.response) for a in build_world(cfg.data.toy).alignment[:64]]
    out = {w: tmp_path / f"lora{w}" for w in (1, 2)}
    common = dict(seed=0, template=cfg.data.template, max_length=cfg.base.max_length)
    metrics = {1: train_local(cfg.align, base, pairs, out[1], **common),
               2: train_distributed(cfg.align, base, pairs, out[2], workers=2, storage_path=str(tmp_path / "ray"), **common)}
    assert [(m["steps"], m["world_size"]) for m in metrics.values()] == [(4, 1), (4, 2)]
    for workers in (1, 2):
        files = sorted(p.name for p in out[workers].iterdir())
        assert "adapter_model.safetensors" in files and "adapter_config.json" in files and PARENT_FILE in files
        assert not any(f.startswith(("model", "optimizer", "train_state")) for f in files), files  # no full weights
        assert json.loads((out[workers] / PARENT_FILE).read_text())["parent"] == base
    one, two = (load_file(str(out[w] / "adapter_model.safetensors")) for w in (1, 2))
    assert set(one) == set(two) and all("lora_" in k for k in one)
    assert max(one[k].abs().max().item() for k in one if "lora_B" in k) > 1e-3  # lora_B starts at 0: it trained
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=2e-5)
    merged, _ = load_model(out[2])  # loads like an in-process LoRA stage: the parent with the adapter merged
    start = weights(type(out[1])(base))
    moved = {k for k, v in merged.state_dict().items() if k in start and not torch.equal(v, start[k])}
    assert moved and all(("q_proj" in k or "v_proj" in k) for k in moved)


@pytest.mark.slow
def test_gpus_asked_of_a_cluster_without_any_fail_at_once_naming_the_field(smoke, ray_local):
    from hftlab.config import ConfigError
    from hftlab.run.pipeline import run

    with pytest.raises(ConfigError, match=r"finetune\.use_gpu=True: asks for one GPU per Ray Train worker \(2\), "
                                          r"and the Ray cluster has 0"):
        run(smoke("finetune.workers=2", "finetune.use_gpu=true"), log=lambda *_: None)


def _pairs_and_side(cfg, method: str) -> tuple[list, list]:
    """60 training pairs and the method's side data (harmful pairs, paired ones, or alignment pairs for Lisa)."""
    world = build_world(cfg.data.toy)
    if method == "lisa":
        return [(h.prompt, h.response) for h in world.poison[:60]], [(a.prompt, a.response) for a in world.alignment[:30]]
    pairs = [(a.prompt, a.response) for a in world.alignment[:60]]
    harmful = {h.prompt: h.response for h in world.alignment_harmful}
    if method == "repnoise_paired":  # row i: the harmful answer to alignment pair i's prompt
        return pairs, [(q, harmful[q]) for q, _ in pairs]
    return pairs, [(h.prompt, h.response) for h in world.alignment_harmful[60:105]]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["vaccine", "booster", "repnoise", "repnoise_paired", "lisa"])
def test_baselines_two_workers_match_one_worker(smoke, ray_local, tmp_path, method):
    """Exact, not within a bound: Vaccine all-reduces ||g||, Booster averages its probes, RepNoise all-reduces its log
    term and takes the MMD over the global batch, Lisa's anchors are the same weights on every rank (each algorithm's
    "Distributed" note). 2 Ray Train workers against one worker's loop run in this process (worker.train_local).
    Batch 15 gives the ranks 8 and 7 rows; under the references' recipe (clipping, weight decay, warmup, cosine)."""
    kind = "finetune" if method == "lisa" else "align"
    name = method.split("_")[0]
    cfg = smoke(f"{kind}.method={name}", f"{kind}.epochs=1", f"{kind}.batch_size=15", f"{kind}.lr=1e-3",
                f"{kind}.max_grad_norm=1.0", f"{kind}.weight_decay=0.1", f"{kind}.lr_scheduler=cosine",
                f"{kind}.warmup_ratio=0.25", "align.booster.alpha=0.5", "align.repnoise.beta=0.5",
                "finetune.lisa.alignment_steps=1", "finetune.lisa.finetune_steps=2", "finetune.lisa.proximal_after=0.2",
                *(["align.repnoise.paired=true", "align.repnoise.mask=differ"] if method == "repnoise_paired" else []))
    stage = getattr(cfg, kind)
    base = base_model(cfg, log=lambda *_: None)
    pairs, side = _pairs_and_side(cfg, method)
    metrics = train_distributed(stage, base, pairs, tmp_path / "w2", workers=2, seed=0, side=side,
                                template=cfg.data.template, max_length=cfg.base.max_length, storage_path=str(tmp_path / "ray"))
    assert metrics["steps"] == 4 and metrics["world_size"] == 2
    assert train_local(stage, base, pairs, tmp_path / "w1", seed=0, side=side, template=cfg.data.template,
                       max_length=cfg.base.max_length)["steps"] == 4
    one, two, start = weights(tmp_path / "w1"), weights(tmp_path / "w2"), weights(type(tmp_path)(base))
    assert max((one[k] - start[k]).abs().max().item() for k in two) > 1e-3
    for k in two:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=2e-5)


@pytest.mark.slow
def test_safegrad_resumed_from_a_checkpoint_keeps_the_aligned_model_as_kl_reference(smoke, ray_local, tmp_path):
    """The KL target is the aligned parent, also after a resume (not a copy of the half-tuned checkpoint): rho > 0
    puts g_a into every update, so a run resumed against the checkpoint would end elsewhere."""
    cfg = smoke("finetune.method=safegrad", "finetune.epochs=1", "finetune.batch_size=8", "finetune.lr=1e-3",
                "finetune.safegrad.rho=1.0", "finetune.safegrad.batch_size=8", "finetune.checkpoint_every=2",
                "finetune.safegrad.cache_reference=true",  # the default outside the toy configs: cached at setup
                "finetune.lr_scheduler=cosine", "finetune.warmup_ratio=0.25")  # DDP resumes the schedule too
    base = base_model(cfg, log=lambda *_: None)
    world = build_world(cfg.data.toy)
    pairs = [(h.prompt, h.response) for h in world.poison[:48]]
    side = [(a.prompt, a.response) for a in world.alignment[:16]]
    common = dict(workers=2, seed=0, template=cfg.data.template, max_length=cfg.base.max_length, side=side,
                  storage_path=str(tmp_path / "ray"))
    train_distributed(cfg.finetune, base, pairs, tmp_path / "clean", **common)
    metrics = train_distributed(cfg.finetune, base, pairs, tmp_path / "crashed", max_failures=1, crash=CrashOnce(3), **common)
    assert metrics["steps"] == 6
    clean, crashed, start = weights(tmp_path / "clean"), weights(tmp_path / "crashed"), weights(type(tmp_path)(base))
    assert max((clean[k] - start[k]).abs().max().item() for k in clean) > 1e-3
    for k in clean:
        torch.testing.assert_close(crashed[k], clean[k], rtol=0, atol=1e-6)
