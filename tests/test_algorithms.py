"""VAA's parts against hand-computed values: group sampler, weight perturbation, lambda curriculum, the step."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from hftlab.algorithms.curriculum import constant, linear, make_schedule, use_perturbed
from hftlab.algorithms.perturbation import apply, compute_eps, global_norm, perturbed, restore, trainable_params
from hftlab.algorithms.sampler import GroupSampler
from hftlab.algorithms.sft import sft_step
from hftlab.algorithms.vaa import VAAStep
from hftlab.training.engine import LocalEngine

VOCAB, DIM, SEQ = 11, 8, 6


class TinyLM(torch.nn.Module):
    """Embedding -> 2-layer MLP -> logits, answering model(input_ids=, attention_mask=, labels=).loss like an HF LM."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, DIM)
        self.fc = torch.nn.Linear(DIM, DIM)
        self.out = torch.nn.Linear(DIM, VOCAB)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc(self.emb(input_ids))))

    def forward(self, input_ids, attention_mask, labels) -> SimpleNamespace:
        logits = self.logits(input_ids)
        return SimpleNamespace(loss=F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100))


class SGDEngine(LocalEngine):
    """Plain SGD, so an update is exactly theta - lr * grad and the expected gradient can be read back."""

    def __init__(self, model: torch.nn.Module, lr: float) -> None:
        super().__init__(model, lr)
        self.optimizer = torch.optim.SGD(self.params, lr=lr)


def make_model(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM()


def group_batches(model: TinyLM, seed: int = 1) -> dict[int, dict[str, torch.Tensor]]:
    """Group 0: labels the model already favours (low loss); group 1: the labels it likes least (high loss)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (4, SEQ), generator=g)
    with torch.no_grad():
        logits = model.logits(ids)
    mask = torch.ones_like(ids)
    return {0: {"input_ids": ids, "attention_mask": mask, "labels": logits.argmax(-1)},
            1: {"input_ids": ids, "attention_mask": mask, "labels": logits.argmin(-1)}}


def params_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ---- sampler ----------------------------------------------------------------------------------------------------


def test_sampler_update_matches_hand_computed_mirror_ascent():
    s = GroupSampler(2, eta_q=0.5, importance_weighted=False, q_min=None, q_max=None)
    assert s.probs() == [0.5, 0.5]
    s.update(0, 1.0)
    q0 = math.exp(0.5) / (math.exp(0.5) + 1)  # 0.5 e^0.5 / (0.5 e^0.5 + 0.5)
    assert s.probs() == pytest.approx([q0, 1 - q0], abs=1e-12)
    s.update(1, 2.0)  # only group 1 moves: q1 e^(0.5 * 2), then renormalise
    z = q0 + (1 - q0) * math.e
    assert s.probs() == pytest.approx([q0 / z, (1 - q0) * math.e / z], abs=1e-12)


def test_sampler_importance_weighted_divides_the_loss_by_q():
    s = GroupSampler(2, eta_q=0.5, importance_weighted=True, q_min=None, q_max=None)
    s.update(0, 1.0)  # f = 1.0 / 0.5 = 2 -> q0 = e^1 / (e^1 + 1)
    q0 = math.e / (math.e + 1)
    assert s.probs()[0] == pytest.approx(q0, abs=1e-12)
    s.update(1, 0.3)  # f = 0.3 / q1
    q1 = 1 - q0
    w1 = q1 * math.exp(0.5 * 0.3 / q1)
    assert s.probs() == pytest.approx([q0 / (q0 + w1), w1 / (q0 + w1)], abs=1e-12)


def test_sampler_clipping_two_groups_is_exact():
    s = GroupSampler(2, eta_q=10.0, importance_weighted=False)  # default bounds [0.1, 0.9]
    for _ in range(3):
        s.update(0, 1.0)
        assert s.probs() == pytest.approx([0.9, 0.1], abs=1e-12)
    assert sum(s.probs()) == pytest.approx(1.0, abs=1e-12)


def test_sampler_clipping_is_one_clamp_then_one_renormalisation():
    s = GroupSampler(3, eta_q=10.0, importance_weighted=False, q_min=0.1, q_max=0.9)
    s.update(0, 1.0)  # raw q ~ [0.99991, 4.5e-5, 4.5e-5] -> clamp [0.9, 0.1, 0.1] -> / 1.1
    assert s.probs() == pytest.approx([0.9 / 1.1, 0.1 / 1.1, 0.1 / 1.1], abs=1e-12)
    assert s.probs()[1] < 0.1  # documented: a single renormalisation can leave q slightly outside the bounds


def test_sampler_same_seed_same_groups_and_all_groups_drawn():
    def run(seed: int) -> list[int]:
        s, gen, seq = GroupSampler(3, eta_q=0.1), torch.Generator().manual_seed(seed), []
        for _ in range(200):
            g = s.sample(gen)
            s.update(g, [0.5, 1.0, 2.0][g])
            seq.append(g)
        return seq

    a, b = run(7), run(7)
    assert a == b and set(a) == {0, 1, 2}
    assert run(8) != a


def test_sampler_state_dict_round_trip_continues_identically():
    losses = [0.4, 1.7]
    s, gen = GroupSampler(2, eta_q=0.05), torch.Generator().manual_seed(3)
    for _ in range(20):
        g = s.sample(gen)
        s.update(g, losses[g])
    state, gen_state = s.state_dict(), gen.get_state()

    def cont(sampler: GroupSampler, generator: torch.Generator) -> list[int]:
        seq = []
        for _ in range(30):
            g = sampler.sample(generator)
            sampler.update(g, losses[g])
            seq.append(g)
        return seq

    expected = cont(s, gen)
    fresh = GroupSampler(2, mode="uniform", eta_q=9.0, importance_weighted=False, q_min=None, q_max=None)
    fresh.load_state_dict(state)
    assert (fresh.mode, fresh.eta_q, fresh.importance_weighted, fresh.q_min, fresh.q_max) == ("dro", 0.05, True, 0.1, 0.9)
    gen2 = torch.Generator()
    gen2.set_state(gen_state)
    assert cont(fresh, gen2) == expected
    assert torch.equal(fresh.q, s.q)


def test_sampler_importance_and_uniform_modes_never_move():
    imp = GroupSampler(2, mode="importance", group_sizes=[300, 100])
    assert imp.probs() == pytest.approx([0.75, 0.25])
    imp.update(1, 100.0)
    assert imp.probs() == pytest.approx([0.75, 0.25])
    gen = torch.Generator().manual_seed(0)
    draws = [imp.sample(gen) for _ in range(4000)]
    assert draws.count(0) / 4000 == pytest.approx(0.75, abs=0.03)
    uni = GroupSampler(3, mode="uniform")
    uni.update(2, 50.0)
    assert uni.probs() == pytest.approx([1 / 3] * 3)
    with pytest.raises(ValueError):
        GroupSampler(2, mode="importance")


# ---- perturbation -----------------------------------------------------------------------------------------------


def _grads_of(model: TinyLM, scale: float = 1.0) -> list[torch.Tensor]:
    batch = group_batches(model)[1]
    return list(torch.autograd.grad(scale * model(**batch).loss, trainable_params(model)))


def test_eps_has_global_norm_rho_and_gradient_direction():
    model = make_model()
    grads = _grads_of(model)
    eps = compute_eps(grads, rho=0.05)
    total = math.sqrt(sum(float(e.pow(2).sum()) for e in eps))
    assert total == pytest.approx(0.05, abs=1e-6)
    g_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
    assert float(global_norm(grads)) == pytest.approx(g_norm, rel=1e-6)
    for g, e in zip(grads, eps, strict=True):
        torch.testing.assert_close(e, 0.05 * g / g_norm, rtol=1e-5, atol=1e-8)


def test_eps_is_zero_when_gradients_are_zero():
    model = make_model()
    eps = compute_eps(_grads_of(model, scale=0.0), 0.1)
    assert all(torch.equal(e, torch.zeros_like(p)) and not e.isnan().any()
               for p, e in zip(trainable_params(model), eps, strict=True))
    assert compute_eps([], 0.1) == []


def test_perturbed_restores_theta_bit_for_bit():
    model = make_model()
    params = trainable_params(model)
    before = params_of(model)
    eps = compute_eps(_grads_of(model), rho=0.5)
    with perturbed(params, eps):
        assert not all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
        # what subtracting eps would give: not theta, which is why restore copies
        assert any(not torch.equal(p.detach() - e, b) for p, e, b in zip(params, eps, before, strict=True))
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    with pytest.raises(RuntimeError), perturbed(params, eps):
        raise RuntimeError("boom")
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    backup = apply(params, eps)
    restore(params, backup)
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


# ---- curriculum -------------------------------------------------------------------------------------------------


def test_linear_lambda_values_and_clamping():
    assert linear(0, 100, 0.8) == 0.0
    assert linear(50, 100, 0.8) == pytest.approx(0.4)
    assert linear(100, 100, 0.8) == pytest.approx(0.8)
    assert linear(250, 100, 0.8) == pytest.approx(0.8)
    assert linear(-3, 100, 0.8) == 0.0
    assert constant(0.3)(0, 10) == constant(0.3)(99, 10) == 0.3
    assert make_schedule("linear", 1.0)(25, 100) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        make_schedule("cosine", 1.0)


def test_use_perturbed_frequency_matches_lambda():
    gen = torch.Generator().manual_seed(0)
    hits = sum(use_perturbed(0.3, gen) for _ in range(10_000))
    assert hits / 10_000 == pytest.approx(0.3, abs=0.02)
    assert not any(use_perturbed(0.0, gen) for _ in range(500))
    assert all(use_perturbed(1.0, gen) for _ in range(500))


# ---- the VAA step -----------------------------------------------------------------------------------------------


def test_rho_zero_stochastic_equals_plain_sft_on_the_sampled_group():
    model = make_model()
    ref = copy.deepcopy(model)
    batches = group_batches(model)
    step = VAAStep(GroupSampler(2, mode="uniform"), rho=0.0, total_steps=10, schedule=constant(1.0), seed=5)
    eng, ref_eng = LocalEngine(model, lr=1e-2), LocalEngine(ref, lr=1e-2)
    groups = []
    for _ in range(10):
        stats = step(model, batches.__getitem__, eng)
        sft_step(ref, batches[stats["group"]], ref_eng)
        groups.append(stats["group"])
        assert stats["n_backward"] == 1 and math.isnan(stats["perturbed_loss"])
    assert set(groups) == {0, 1}
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters(), strict=True))


def test_weighted_lambda_zero_equals_plain_sft():
    model = make_model()
    ref = copy.deepcopy(model)
    batches = group_batches(model)
    step = VAAStep(GroupSampler(2), rho=0.05, total_steps=5, schedule=constant(0.0), objective="weighted", seed=1)
    eng, ref_eng = LocalEngine(model, lr=1e-2), LocalEngine(ref, lr=1e-2)
    for _ in range(5):
        stats = step(model, batches.__getitem__, eng)
        sft_step(ref, batches[stats["group"]], ref_eng)
        assert stats["n_backward"] == 1 and stats["lambda"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters(), strict=True))


def _grads_at(model: TinyLM, batch: dict, shift: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Gradient of the batch loss at theta (+ shift) on a copy, computed by hand with autograd."""
    m = copy.deepcopy(model)
    if shift is not None:
        with torch.no_grad():
            for p, s in zip(m.parameters(), shift, strict=True):
                p.add_(s)
    return list(torch.autograd.grad(m(**batch).loss, list(m.parameters())))


@pytest.mark.parametrize("objective,lam", [("stochastic", 1.0), ("weighted", 0.3)])
def test_perturbed_update_matches_hand_computed_sam_gradient(objective, lam):
    model, rho = make_model(), 0.1
    batches = group_batches(model)
    sampler = GroupSampler(2, mode="uniform")
    step = VAAStep(sampler, rho=rho, total_steps=1, schedule=constant(lam), objective=objective, seed=2)
    theta = params_of(model)
    stats = step(model, batches.__getitem__, SGDEngine(model, lr=1.0))  # SGD lr 1: theta' = theta - grad
    batch = batches[stats["group"]]
    ref = make_model()  # same seed: theta before the step
    g = _grads_at(ref, batch)
    norm = torch.sqrt(sum((x * x).sum() for x in g))
    g_pert = _grads_at(ref, batch, [rho * x / norm for x in g])
    w_clean = 0.0 if objective == "stochastic" else 1 - lam
    w_pert = 1.0 if objective == "stochastic" else lam
    for t, p, gc, gp in zip(theta, model.parameters(), g, g_pert, strict=True):
        torch.testing.assert_close(p.detach(), t - (w_clean * gc + w_pert * gp), rtol=1e-5, atol=1e-6)
    assert stats["n_backward"] == 2 and stats["perturbed_loss"] > stats["loss"]  # eps ascends the loss


def test_n_backward_averages_one_and_a_half_over_a_linear_schedule():
    model = make_model()
    batches = group_batches(model)
    total = 400
    step = VAAStep(GroupSampler(2), rho=0.05, total_steps=total, seed=3)  # linear 0 -> 1 by default
    eng = SGDEngine(model, lr=0.0)
    n = [step(model, batches.__getitem__, eng)["n_backward"] for _ in range(total)]
    assert sum(n) / total == pytest.approx(1.5, abs=0.08)
    assert sum(n[:100]) / 100 < 1.25 < 1.75 < sum(n[-100:]) / 100  # the curriculum really ramps
    assert step.steps_done == total and step.current_lambda() == 1.0


def test_q_moves_toward_the_group_with_the_higher_loss():
    model = make_model()
    batches = group_batches(model)
    total = 300
    step = VAAStep(GroupSampler(2, eta_q=0.01), rho=0.05, total_steps=total, seed=4)  # importance-weighted, clip 0.1/0.9
    eng = LocalEngine(model, lr=1e-4)
    history = [step(model, batches.__getitem__, eng) for _ in range(total)]
    loss_by_group = {g: [h["loss"] for h in history if h["group"] == g] for g in (0, 1)}
    assert min(loss_by_group[1]) > max(loss_by_group[0])  # group 1 is the hard one throughout
    assert history[-1]["q_1"] > 0.75 and history[-1]["q_0"] < 0.25
    assert history[-1]["q_0"] + history[-1]["q_1"] == pytest.approx(1.0)
    assert 0.1 - 1e-12 <= min(h["q_1"] for h in history) and max(h["q_1"] for h in history) <= 0.9 + 1e-12
    assert sum(h["group"] for h in history[-100:]) > 70  # the hard group now gets most of the steps
    assert set(history[0]) >= {"loss", "perturbed_loss", "group", "lambda", "q_0", "q_1", "n_backward"}


def test_vaa_state_dict_resumes_the_same_choices():
    model = make_model()
    batches = group_batches(model)
    a = VAAStep(GroupSampler(2, eta_q=0.1), rho=0.05, total_steps=20, seed=9)
    eng = SGDEngine(model, lr=0.0)  # frozen weights: only the step's own state decides the choices
    for _ in range(8):
        a(model, batches.__getitem__, eng)
    state = a.state_dict()
    rest = [(s["group"], s["n_backward"], s["lambda"]) for s in (a(model, batches.__getitem__, eng) for _ in range(12))]
    b = VAAStep(GroupSampler(2, eta_q=0.1), rho=0.05, total_steps=20, seed=0)
    b.load_state_dict(state)
    again = [(s["group"], s["n_backward"], s["lambda"]) for s in (b(model, batches.__getitem__, eng) for _ in range(12))]
    assert again == rest


def test_sampler_mean_scale_makes_eta_independent_of_the_loss_scale():
    """scale="mean": losses 100x larger move q exactly as much; with scale="raw" they move it far more."""
    losses = [(0, 2.0), (1, 3.0), (0, 1.5), (1, 2.5), (1, 2.0)]
    runs = {}
    for scale in ("mean", "raw"):
        for factor in (1.0, 100.0):
            s = GroupSampler(2, eta_q=0.05, scale=scale, q_min=0.01, q_max=0.99)
            for g, loss in losses:
                s.update(g, loss * factor)
            runs[(scale, factor)] = s.probs()
    assert runs[("mean", 1.0)] == pytest.approx(runs[("mean", 100.0)], abs=1e-12)
    assert abs(runs[("raw", 100.0)][1] - 0.5) > 3 * abs(runs[("raw", 1.0)][1] - 0.5), runs
    # by hand, first update: running mean = 2.0, f = (2.0 / 2.0) / q_0 = 2, q_0 = e^{0.1} / (e^{0.1} + 1)
    s = GroupSampler(2, eta_q=0.05, scale="mean", q_min=None, q_max=None)
    s.update(0, 2.0)
    assert s.probs()[0] == pytest.approx(math.exp(0.1) / (math.exp(0.1) + 1))
    restored = GroupSampler(2, eta_q=0.05, scale="raw", q_min=None, q_max=None)
    restored.load_state_dict(s.state_dict())
    assert restored.scale == "mean" and restored.loss_mean == 2.0


def test_compute_matched_sft_takes_vaa_backward_passes_in_steps():
    from hftlab.algorithms.vaa import expected_backward
    from hftlab.config.schema import AlignConfig, VAAConfig
    from hftlab.training.methods import step_budget

    # linear 0 -> 1 over 4 steps: lambdas 0, 1/4, 2/4, 3/4 -> 1 + 1.5 / 4 = 1.375 backward passes per step
    assert expected_backward(0.4, "stochastic", make_schedule("linear", 1.0), 4) == pytest.approx(1.375)
    assert expected_backward(0.4, "weighted", make_schedule("linear", 1.0), 4) == pytest.approx(1.75)
    assert expected_backward(0.0, "stochastic", make_schedule("linear", 1.0), 4) == 1.0
    # 2040 examples / 32 = 64 batches x 3 epochs = 192 steps; x (1 + 191 / 384) = 287.5 -> 288
    plain = AlignConfig(epochs=3, batch_size=32)
    matched = AlignConfig(epochs=3, batch_size=32, compute_match="vaa", vaa=VAAConfig())
    assert step_budget(plain, 2040) == 192 and step_budget(matched, 2040) == 288


def reference_update_p(p: float, loss: float, eta: float, forget: bool) -> float:
    """ChanLiang/VAA `update_p_with_loss` (trainer.py:L677-L687 @ e00cbf4) written out: p = P(forget group)."""
    if forget:
        w = p * math.exp(eta * loss / p)
        p = w / (w + (1 - p))
    else:
        p = p / (p + (1 - p) * math.exp(eta * loss / (1 - p)))
    return min(max(p, 0.1), 0.9)


@pytest.mark.parametrize("on_perturbed", [True, False])
def test_vaa_sampler_update_is_the_reference_with_the_perturbed_loss(on_perturbed):
    """On a perturbed step the official code feeds the sampler the loss at theta + eps (trainer.py:L794-L795)."""
    model, rho, eta = make_model(), 0.1, 0.3
    batches = group_batches(model)
    step = VAAStep(GroupSampler(2, eta_q=eta), rho=rho, total_steps=1, schedule=constant(1.0), seed=2,
                   update_on_perturbed=on_perturbed)  # lambda 1: the step is perturbed
    ref = copy.deepcopy(model)
    stats = step(model, batches.__getitem__, SGDEngine(model, lr=1.0))
    batch = batches[stats["group"]]
    g = _grads_at(ref, batch)
    norm = torch.sqrt(sum((x * x).sum() for x in g))
    shifted = copy.deepcopy(ref)
    with torch.no_grad():
        for p, x in zip(shifted.parameters(), g, strict=True):
            p.add_(rho * x / norm)
    loss = (shifted(**batch).loss if on_perturbed else ref(**batch).loss).item()
    assert stats["q_1"] == pytest.approx(reference_update_p(0.5, loss, eta, forget=stats["group"] == 1), rel=1e-6)
    assert VAAStep(GroupSampler(2), rho=rho, total_steps=1).update_on_perturbed  # the official code's default


def test_vaa_config_reaches_update_on_perturbed():
    from hftlab.config.schema import VAAConfig
    from hftlab.training.grouped import vaa_setup

    for value in (True, False):
        _, step, _ = vaa_setup(list(range(8)), [0, 1] * 4, VAAConfig(update_on_perturbed=value), epochs=1, batch_size=2,
                               seed=0)
        assert step.update_on_perturbed is value
    assert VAAConfig().update_on_perturbed is True
