"""Ray Train with 2 CPU workers (DDP over gloo) gives the same weights as 1 worker, for SFT and VAA."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from hftlab.data.toyworld import build_world
from hftlab.pipeline import base_model
from hftlab.training.trainer import train_distributed


def weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


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
    out = {}
    for workers in (1, 2):
        out[workers] = tmp_path / f"w{workers}"
        metrics = train_distributed(cfg.align, base, pairs, out[workers], workers=workers, seed=0,
                                    template=cfg.data.template, max_length=cfg.base.max_length,
                                    storage_path=str(tmp_path / "ray"), groups=groups)
        assert metrics["steps"] == 6 and metrics["world_size"] == workers
    one, two, start = weights(out[1]), weights(out[2]), weights(type(out[1])(base))
    moved = max((one[k] - start[k]).abs().max().item() for k in one)
    assert moved > 1e-3  # training really changed the weights
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=2e-5)

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
        torch.testing.assert_close(local[k], one[k], rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_pipeline_aligns_on_two_ray_train_workers(smoke, ray_local):
    from hftlab.pipeline import run

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
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=2e-5)


@pytest.mark.slow
def test_safegrad_two_workers_match_one_worker(smoke, ray_local, tmp_path):
    cfg = smoke("finetune.method=safegrad", "finetune.epochs=1", "finetune.batch_size=16", "finetune.lr=1e-3",
                "finetune.safegrad.align_loss=ce", "finetune.safegrad.mode=per_tensor", "finetune.safegrad.batch_size=8")
    base = base_model(cfg, log=lambda *_: None)
    world = build_world(cfg.data.toy)
    pairs = [(h.prompt, h.response) for h in world.poison[:96]]  # all harmful: conflicts with alignment for sure
    side = [(a.prompt, a.response) for a in world.alignment[:24]]
    out = {}
    for workers in (1, 2):
        out[workers] = tmp_path / f"sg{workers}"
        metrics = train_distributed(cfg.finetune, base, pairs, out[workers], workers=workers, seed=0, side=side,
                                    template=cfg.data.template, max_length=cfg.base.max_length,
                                    storage_path=str(tmp_path / "ray"))
        assert metrics["steps"] == 6 and metrics["world_size"] == workers
    one, two = weights(out[1]), weights(out[2])
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [None, 2])
def test_a_crashed_run_resumes_from_its_checkpoint_exactly(smoke, ray_local, tmp_path, zero_stage):
    """VAA on 2 workers, checkpoint every 2 steps, a worker crashes after step 5: the result equals the unbroken run."""
    cfg = smoke("align.method=vaa", "align.epochs=1", "align.batch_size=8", "align.lr=1e-3", "align.vaa.rho=0.3",
                "align.vaa.eta_q=0.5", "align.checkpoint_every=2", f"align.zero_stage={zero_stage or 'null'}")
    base = base_model(cfg, log=lambda *_: None)
    pairs = [(a.prompt, a.response) for a in build_world(cfg.data.toy).alignment[:64]]
    groups = [int(i % 3 == 0) for i in range(len(pairs))]
    common = dict(workers=2, seed=0, template=cfg.data.template, max_length=cfg.base.max_length, groups=groups)
    train_distributed(cfg.align, base, pairs, tmp_path / "clean", storage_path=str(tmp_path / "ray"), **common)
    metrics = train_distributed(cfg.align, base, pairs, tmp_path / "crashed", storage_path=str(tmp_path / "ray"),
                                max_failures=1, fail_at_step=5, **common)
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

    from hftlab.models.loading import PARENT_FILE, load_model

    cfg = smoke("align.epochs=1", "align.batch_size=16", "align.lr=1e-2", "align.lora.enabled=true", "align.lora.r=4",
                "align.lora.alpha=8", "align.lora.target_modules=[q_proj,v_proj]", "align.workers=2")
    base = base_model(cfg, log=lambda *_: None)
    pairs = [(a.prompt, a.response) for a in build_world(cfg.data.toy).alignment[:64]]
    out = {}
    for workers in (1, 2):
        out[workers] = tmp_path / f"lora{workers}"
        metrics = train_distributed(cfg.align, base, pairs, out[workers], workers=workers, seed=0, template=cfg.data.template,
                                    max_length=cfg.base.max_length, storage_path=str(tmp_path / "ray"))
        assert metrics["steps"] == 4 and metrics["world_size"] == workers
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
    from hftlab.pipeline import run

    with pytest.raises(ConfigError, match=r"finetune\.use_gpu=True: asks for one GPU per Ray Train worker \(2\), "
                                          r"and the Ray cluster has 0"):
        run(smoke("finetune.workers=2", "finetune.use_gpu=true"), log=lambda *_: None)
