"""The speed levers: bucketed batches, bf16 autocast under base.dtype=auto (models/precision.py)."""

from __future__ import annotations

import random

import pytest
import torch

from hftlab.config.errors import ConfigError
from hftlab.models import precision
from hftlab.models.loading import load_model
from hftlab.run.pipeline import base_model
from hftlab.training.batches import batches, epoch_order
from hftlab.training.loop import train


def rows(n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """Encoded rows of lengths 5..200, prompts of 3 tokens."""
    rng = random.Random(seed)
    return [(list(range(rng.randint(5, 200))), 3) for _ in range(n)]


def padded_tokens(encoded, order) -> int:
    return sum(len(b) * max(len(encoded[i][0]) for i in b) for b in order)


def test_bucketed_epoch_covers_every_row_once_with_less_padding_and_depends_on_seed_and_epoch():
    enc = rows(1000)
    random_order = epoch_order(enc, 8, seed=0, epoch=0)
    bucketed = epoch_order(enc, 8, seed=0, epoch=0, bucketed=True)
    assert sorted(i for b in bucketed for i in b) == list(range(1000))
    assert all(len(b) <= 8 for b in bucketed) and len(bucketed) == len(random_order) == 125
    real = sum(len(ids) for ids, _ in enc)
    waste_random = padded_tokens(enc, random_order) / real - 1
    waste_bucketed = padded_tokens(enc, bucketed) / real - 1
    assert waste_random > 0.5 and waste_bucketed < 0.05  # lengths uniform in 5..200: ~75% padding at random, ~2%
    assert bucketed == epoch_order(enc, 8, seed=0, epoch=0, bucketed=True)  # a function of seed and epoch
    assert bucketed != epoch_order(enc, 8, seed=0, epoch=1, bucketed=True)
    assert bucketed != epoch_order(enc, 8, seed=1, epoch=0, bucketed=True)
    # the random form is the shuffle the trainer always drew: the same batches as before this change
    order = list(range(1000))
    random.Random(0 * 1000 + 0).shuffle(order)
    assert random_order == [order[i : i + 8] for i in range(0, 1000, 8)]


def test_bucketed_batches_slice_the_same_global_batches_on_every_rank():
    enc = rows(40)
    one = [b["input_ids"] for b in batches(enc, 8, 0, 0, 0, bucketed=True)]
    two = [list(batches(enc, 8, 0, 0, 0, rank=r, world=2, bucketed=True)) for r in (0, 1)]
    for whole, (a, b) in zip(one, zip(*two, strict=True), strict=True):
        assert whole.shape[0] == a["input_ids"].shape[0] + b["input_ids"].shape[0]
        assert torch.equal(whole[0::2, : a["input_ids"].shape[1]], a["input_ids"])


def test_auto_resolves_to_bf16_only_where_the_hardware_has_it():
    fast = precision.has_bf16()
    assert precision.resolve("auto") == ("bfloat16" if fast else "float32")
    assert precision.resolve("float32") == "float32" and precision.resolve("bfloat16") == "bfloat16"
    assert precision.weights_for_training("auto") == "float32"  # trains in fp32 weights, autocast computes
    assert precision.weights_for_training("bfloat16") == "bfloat16"
    assert precision.autocast_dtype("auto") == ("bfloat16" if fast else None)
    assert precision.autocast_dtype("float32") is None and precision.training_key("float32") == {}


def test_dtype_and_batching_are_validated_naming_the_field(smoke):
    with pytest.raises(ConfigError, match="dtype"):
        smoke("base.dtype=float64")
    with pytest.raises(ConfigError, match="batching"):
        smoke("align.batching=sorted")
    with pytest.raises(ConfigError, match="batching"):
        smoke("align.method=repnoise", "align.repnoise.paired=true", "align.batching=bucketed")


def test_training_under_bf16_autocast_follows_the_fp32_loss_curve(smoke):
    """The toy base trained 16 steps from the same weights and batches, fp32 against fp32 weights under bf16 autocast
    (what base.dtype=auto runs on bf16 hardware; run here whatever the CPU, the tiny model is cheap even emulated):
    the weights stay fp32, and the losses agree to bf16's precision all along the curve."""
    cfg = smoke()
    base = base_model(cfg, log=lambda *a: None)
    pairs = [(f"question {i} about topic {i % 7}", f"answer {i * 3} with detail {i % 5}") for i in range(32)]
    curves = {}
    for cast in (None, "bfloat16"):
        model, tok = load_model(base, dtype="float32")
        losses: list[float] = []
        train(model, tok, pairs, template=cfg.data.template, epochs=4, lr=1e-3, batch_size=8, seed=0, max_length=64,
              on_step=lambda _s, st, out=losses: out.append(st["loss"]), desc="t", bucketed=True, autocast=cast)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        curves[cast] = losses
    fp32, bf16 = curves[None], curves["bfloat16"]
    assert len(fp32) == len(bf16) == 16 and fp32[-1] < 0.8 * fp32[0]  # it trained
    assert max(abs(a - b) / a for a, b in zip(fp32, bf16, strict=True)) < 0.05


def test_recompute_every_second_layer_checkpoints_half_the_layers_and_keeps_the_gradient(smoke):
    """recompute_every_n_layers=2 marks layers 0, 2, ... for recomputation and none else; the gradient is the plain one
    (checkpointing changes memory and time, not the numbers); a training forward builds no KV cache."""
    from hftlab.models.loading import for_training

    cfg = smoke()
    base = base_model(cfg, log=lambda *a: None)
    enc = [(list(range(5, 25)), 4), (list(range(7, 19)), 3)]
    batch = next(batches(enc, 2, 0, 0))
    grads = {}
    for every in (0, 1, 2):
        model, _ = load_model(base, dtype="float32")
        model = for_training(model, every > 0, max(every, 1)).train()
        if every:
            layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
            assert [m.gradient_checkpointing for m in layers] == [i % every == 0 for i in range(len(layers))]
        assert model.config.use_cache is False
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        out.loss.backward()
        grads[every] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and torch.allclose(grads[0], grads[2], atol=1e-6)


def test_backend_auto_is_the_one_measured_faster_here_and_vllm_settings_are_validated(smoke):
    """eval.backend=auto: vLLM on a GPU, and on this CPU (measured faster, docs/performance.md) when it is installed;
    HF where it is not. The stage keys see the resolved backend, so auto and its resolution share one cache."""
    import importlib.util

    from hftlab.config.evaluation import resolve_backend

    expected = "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    assert resolve_backend("auto") == expected and resolve_backend("hf") == "hf"
    assert smoke().eval.vllm.merges_lora == (not torch.cuda.is_available())  # auto: merged LoRA stages on a CPU
    assert smoke("eval.vllm.lora=request").eval.vllm.merges_lora is False
    with pytest.raises(ConfigError, match=r"^eval.vllm.lora='fused'"):
        smoke("eval.vllm.lora=fused")
    assert smoke("eval.backend=auto").eval.generation_backend == expected
    assert smoke("groups.backend=auto").groups.generation_backend == expected
    with pytest.raises(ConfigError, match="cpu_cores"):
        smoke("eval.vllm.cpu_cores=some")
