"""SafeGrad's parts against hand-computed values: projection (global, per tensor), the step, cadence, KL reference."""

from __future__ import annotations

import copy

import pytest
import torch

from hftlab.algorithms.projection import cosine, project
from hftlab.algorithms.safegrad import CachedReference, SafeGradStep, kl_to_reference, response_logprobs
from hftlab.algorithms.sft import sft_step
from tests.test_algorithms import SGDEngine, group_batches, make_model, params_of


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_global_projection_removes_the_conflict_by_hand():
    g_u, g_a = [t([2.0, 1.0]), t([0.0])], [t([-1.0, 0.0]), t([0.0])]  # dot -2, ||g_a||^2 1 -> g_u + 2 g_a
    out, rate = project(g_u, g_a, "global")
    assert rate == 1.0
    torch.testing.assert_close(out[0], t([0.0, 1.0]))
    assert sum(float((u * a).sum()) for u, a in zip(out, g_a, strict=True)) >= -1e-6
    assert cosine(g_u, g_a) < 0 and cosine(out, g_a) == pytest.approx(0.0, abs=1e-7)


def test_no_conflict_returns_the_same_tensors():
    g_u, g_a = [t([1.0, 2.0]), t([3.0])], [t([1.0, 0.0]), t([0.1])]  # dot 1 + 0.3 > 0
    out, rate = project(g_u, g_a, "global")
    assert rate == 0.0 and all(o is u for o, u in zip(out, g_u, strict=True))
    out, rate = project(g_u, [torch.zeros(2), torch.zeros(1)], "per_tensor")  # a zero g_a: nothing to project on
    assert rate == 0.0 and all(o is u for o, u in zip(out, g_u, strict=True))


def test_per_tensor_and_global_differ_on_a_hand_made_example():
    g_u = [t([1.0, 0.0]), t([0.0, 2.0])]
    g_a = [t([-1.0, 0.0]), t([0.0, 1.0])]  # tensor 1 conflicts (-1), tensor 2 agrees (+2): globally +1, no conflict
    out, rate = project(g_u, g_a, "global")
    assert rate == 0.0 and out[0] is g_u[0]
    out, rate = project(g_u, g_a, "per_tensor")
    assert rate == 0.5
    torch.testing.assert_close(out[0], t([0.0, 0.0]))  # [1,0] - (-1/1) * [-1,0]
    assert out[1] is g_u[1]
    for u, a in zip(out, g_a, strict=True):
        assert float((u * a).sum()) >= -1e-7
    with pytest.raises(ValueError, match="mode"):
        project(g_u, g_a, "layer")


def _grads(model, batch, scale=1.0):
    m = copy.deepcopy(model)
    return list(torch.autograd.grad(scale * m(**batch).loss, list(m.parameters())))


@pytest.mark.parametrize("rho", [0.0, 0.5])
def test_step_applies_the_projected_gradient_plus_rho_g_a(rho):
    model = make_model()
    batches = group_batches(model)
    user, align = batches[1], batches[0]  # labels the model likes least vs most
    g_u, g_a = _grads(model, user), _grads(model, align)
    expected, rate = project(g_u, g_a, "global")
    assert rate == 1.0, "the hand-made batches must conflict for this test to mean something"
    theta = params_of(model)
    step = SafeGradStep(lambda: align, align_loss="ce", mode="global", rho=rho)
    stats = step(model, user, SGDEngine(model, lr=1.0))
    for th, p, e, a in zip(theta, model.parameters(), expected, g_a, strict=True):
        torch.testing.assert_close(p.detach(), th - (e + rho * a), rtol=1e-5, atol=1e-6)
    assert stats["conflict"] == 1.0 and stats["cos_before"] < 0 and stats["n_backward"] == 2
    if rho == 0:
        assert stats["cos_after"] == pytest.approx(0.0, abs=1e-6)


def test_step_without_conflict_is_plain_fine_tuning_bit_for_bit():
    model = make_model()
    ref = copy.deepcopy(model)
    batch = group_batches(model)[1]
    step = SafeGradStep(lambda: batch, align_loss="ce")  # g_a = g_u: never a conflict
    eng, ref_eng = SGDEngine(model, lr=0.1), SGDEngine(ref, lr=0.1)
    for _ in range(3):
        assert step(model, batch, eng)["conflict"] == 0.0
        sft_step(ref, batch, ref_eng)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters(), strict=True))


def test_cadence_reuses_the_alignment_gradient():
    model = make_model()
    batches = group_batches(model)
    calls = []

    def align_batch():
        calls.append(1)
        return batches[0]

    step = SafeGradStep(align_batch, align_loss="ce", cadence=4)
    eng = SGDEngine(model, lr=0.01)
    n = [step(model, batches[1], eng)["n_backward"] for _ in range(9)]
    assert n == [2, 1, 1, 1, 2, 1, 1, 1, 2] and len(calls) == 3
    with pytest.raises(ValueError, match="cadence"):
        SafeGradStep(align_batch, align_loss="ce", cadence=0)


def test_kl_to_itself_is_zero_and_grows_when_the_model_moves():
    model = make_model()
    batch = group_batches(model)[1]
    frozen = copy.deepcopy(model)

    def reference(b):
        return response_logprobs(frozen.logits(b["input_ids"]), b["labels"])

    class Wrapper(torch.nn.Module):  # the KL loss reads .logits like an HF model's output
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": self.inner.logits(input_ids)})()

    step = SafeGradStep(lambda: batch, align_loss="kl", reference=reference)
    assert step.alignment_loss(Wrapper(model), batch).item() == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        model.out.bias.add_(0.5 * torch.randn_like(model.out.bias))
    assert step.alignment_loss(Wrapper(model), batch).item() > 1e-3
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 1, 2, 3], [-100, 4, 5, -100, -100]])
    assert float(kl_to_reference(logits, response_logprobs(logits, labels), labels)) == pytest.approx(0.0, abs=1e-6)
    # by hand: KL(P_ref || P) = sum_v p_ref (log p_ref - log p) per response token, mean over the 5 response tokens
    other = torch.randn(2, 5, 7)
    want = torch.stack([(other[b, i].softmax(-1) * (other[b, i].log_softmax(-1) - logits[b, i].log_softmax(-1))).sum()
                        for b, i in [(0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]]).mean()
    assert float(kl_to_reference(logits, response_logprobs(other, labels), labels)) == pytest.approx(float(want), rel=1e-5)
    with pytest.raises(ValueError, match="reference"):
        SafeGradStep(lambda: batch, align_loss="kl")


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


def test_kl_reference_under_lora_is_the_aligned_model_with_the_adapter_off():
    from hftlab.config.schema import FinetuneConfig, LoraConfig
    from hftlab.models.loading import add_lora
    from hftlab.training.engine import LocalEngine
    from hftlab.training.methods import build_step

    aligned = _tiny_llama()
    frozen = copy.deepcopy(aligned)
    ids = torch.randint(3, 40, (4, 10), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    model = add_lora(aligned, LoraConfig(enabled=True, r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    engine = LocalEngine(model, lr=0.05)
    stage = FinetuneConfig(method="safegrad")  # KL against the aligned model, global projection
    step = build_step(stage, engine, side=lambda: batch)
    assert step.alignment_loss(engine.module, batch).item() == pytest.approx(0.0, abs=1e-6)  # KL to itself
    for _ in range(3):
        step(model, batch, engine)
    with torch.no_grad():
        want = frozen(input_ids=ids, attention_mask=batch["attention_mask"]).logits
        moved = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
        got = step.reference(batch)
    assert (moved - want).abs().max() > 1e-4  # the adapter really trained
    torch.testing.assert_close(got, response_logprobs(want, batch["labels"]), rtol=1e-5, atol=1e-5)  # still aligned
    assert step.alignment_loss(engine.module, batch).item() > 0


def test_cached_reference_serves_any_batch_of_the_alignment_set_as_a_reference_forward_would():
    """Computed once over the fixed alignment rows; a shuffled, differently padded batch gets the same log-probs."""
    from hftlab.config.schema import FinetuneConfig
    from hftlab.training.batches import batches, collate
    from hftlab.training.engine import LocalEngine
    from hftlab.training.methods import build_step

    aligned = _tiny_llama()
    frozen = copy.deepcopy(aligned)
    g = torch.Generator().manual_seed(2)
    rows = [(torch.randint(3, 40, (int(n),), generator=g).tolist(), 3) for n in torch.randint(6, 14, (10,), generator=g)]
    engine = LocalEngine(aligned, lr=0.05)
    stream = iter(list(batches(rows, 4, 0, seed=5)))
    step = build_step(FinetuneConfig(method="safegrad"), engine, side=lambda: next(stream), side_rows=rows, pad_id=0)
    assert isinstance(step.reference, CachedReference) and len(step.reference.cache) == 10
    with torch.no_grad():
        aligned.model.embed_tokens.weight.add_(0.3)  # the model moves; the cache stays the aligned model's
    for b in batches(rows, 4, 0, seed=9):
        with torch.no_grad():
            want = response_logprobs(frozen(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
        torch.testing.assert_close(step.reference(b), want, rtol=1e-5, atol=1e-5)
    uncached = build_step(FinetuneConfig(method="safegrad"), LocalEngine(frozen, lr=0.05), side=lambda: None)
    assert not isinstance(uncached.reference, CachedReference)
    one = collate(rows[:1], 0)
    one["labels"][:] = -100  # a rank's dummy row: nothing to look up
    assert step.reference(one).shape[0] == 0


@pytest.mark.slow
def test_pipeline_runs_safegrad_and_tracks_the_conflict_rate(smoke, tmp_path):
    import mlflow

    from hftlab.run.pipeline import run

    cfg = smoke("finetune.method=safegrad", "finetune.safegrad.mode=per_tensor", "finetune.safegrad.n_alignment=20")
    summary = run(cfg, log=lambda *_: None)
    assert summary["aligned"]["hs"] <= 20.0
    client = mlflow.MlflowClient(tracking_uri=summary["tracking_uri"])
    history = client.get_metric_history(summary["run_id"], "finetune.conflict")
    assert history and all(0.0 <= m.value <= 1.0 for m in history)
    assert any(m.value > 0 for m in history)  # poisoned fine-tuning does conflict with alignment
    assert client.get_metric_history(summary["run_id"], "finetune.cos_before")
