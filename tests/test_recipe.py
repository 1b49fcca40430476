"""The training recipe (training/engine.py): HF's lr schedules, clipping, weight-decay groups, resumable schedule."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, get_scheduler

from hftlab.config import ConfigError, load_config
from hftlab.training.engine import LocalEngine, Recipe, param_groups
from tests.conftest import REPO


@pytest.mark.parametrize("kind,hf", [("constant", "constant_with_warmup"), ("linear", "linear"), ("cosine", "cosine")])
def test_schedule_is_hf_schedule(kind, hf):
    """Our factor(t) against transformers' own schedulers, warmup = ceil(ratio * total) as HF's get_warmup_steps."""
    total, ratio = 23, 0.15
    recipe = Recipe(1.0, lr_scheduler=kind, warmup_ratio=ratio, total_steps=total)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_scheduler(hf, opt, num_warmup_steps=math.ceil(ratio * total), num_training_steps=total)
    for t in range(total):
        assert recipe.factor(t) == pytest.approx(sched.lr_lambdas[0](t), abs=1e-12), t
    assert Recipe(1.0, total_steps=total).factor(0) == 1.0  # constant without warmup: the full lr from step 0


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=30, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16))


def _loss(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(1, 9).unsqueeze(0)
    return 50 * model(input_ids=ids, labels=ids).loss  # large: its gradient norm is far above the clip


def test_step_clips_the_global_norm_and_applies_the_scheduled_lr():
    model = _model()
    recipe = Recipe(0.1, max_grad_norm=0.5, lr_scheduler="linear", warmup_ratio=0.0, total_steps=4)
    engine = LocalEngine(model, recipe)
    engine.optimizer = torch.optim.SGD(engine.params, lr=0.1)  # SGD: the update is lr * clipped gradient
    theta = [p.detach().clone() for p in engine.params]
    g = torch.autograd.grad(_loss(model), engine.params)
    norm = torch.linalg.vector_norm(torch.stack([x.norm() for x in g]))
    assert norm > 5
    engine.backward(_loss(model))
    engine.step()
    for t, p, x in zip(theta, engine.params, g, strict=True):  # torch's clip: coef = max_norm / (norm + 1e-6)
        torch.testing.assert_close(p.detach(), t - 0.1 * 1.0 * x * (0.5 / (norm + 1e-6)), rtol=1e-5, atol=1e-7)
    assert engine.steps_taken == 1 and engine.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    engine.backward(_loss(model))
    engine.step()
    assert engine.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 3 / 4)  # linear decay: (4 - 1) / 4


def test_weight_decay_skips_biases_and_norm_weights():
    model = _model()
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(30))
    decay, no_decay = param_groups(model, 0.1)
    norms = {id(m.weight) for m in model.modules() if type(m).__name__.endswith("RMSNorm")}
    assert {id(p) for p in no_decay["params"]} == norms | {id(model.lm_head.bias)}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert len(param_groups(model, 0.0)) == 1  # no decay: one group, the optimizer exactly as before


def test_the_schedule_position_is_saved_and_resumed(tmp_path):
    model = _model()
    recipe = Recipe(0.1, lr_scheduler="cosine", warmup_ratio=0.25, total_steps=8)
    a = LocalEngine(model, recipe)
    for _ in range(3):
        a.backward(_loss(model))
        a.step()
    a.save(tmp_path, rank=0)
    b = LocalEngine(model, recipe)
    b.load(tmp_path)
    assert b.steps_taken == 3
    b.backward(_loss(model))
    b.step()
    assert b.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * recipe.factor(3))


def test_recipe_config_defaults_and_checks():
    cfg = load_config(REPO / "configs" / "smoke.yaml", [])
    assert cfg.align.max_grad_norm is None and cfg.align.weight_decay == 0.0  # the toy world pins its measured recipe
    from hftlab.config.schema import AlignConfig, FinetuneConfig, LoraConfig

    for stage in (AlignConfig(), FinetuneConfig()):
        assert (stage.max_grad_norm, stage.weight_decay, stage.lr_scheduler, stage.warmup_ratio) == (1.0, 0.1, "constant", 0.0)
    lora = LoraConfig()
    assert lora.dropout == 0.1 and set(lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj",
                                                                 "down_proj", "gate_proj"}
    for override, message in [("align.lr_scheduler=step", "align.lr_scheduler='step': must be one of"),
                              ("finetune.warmup_ratio=1.5", "finetune.warmup_ratio=1.5: must be in [0, 1)"),
                              ("align.max_grad_norm=0", "align.max_grad_norm=0")]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
            load_config(REPO / "configs" / "smoke.yaml", [override])
