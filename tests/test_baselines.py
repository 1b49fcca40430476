"""Vaccine, Booster and RepNoise against hand-computed values, on a tiny random Llama (no download)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from hftlab.algorithms.booster import BoosterStep, surrogate
from hftlab.algorithms.repnoise import RepNoiseStep, mmd
from hftlab.algorithms.sft import sft_step
from hftlab.algorithms.vaccine import VaccineStep, find_layers
from hftlab.training.engine import LocalEngine
from tests.test_algorithms import SGDEngine

VOCAB = 50


def make_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0)
    return LlamaForCausalLM(cfg).train()


def make_batch(seed: int, rows: int = 3, width: int = 8) -> dict[str, torch.Tensor]:
    """Random ids; the first 3 tokens are the prompt (-100), the last row is right-padded by 2."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (rows, width), generator=g)
    mask = torch.ones_like(ids)
    ids[-1, -2:], mask[-1, -2:] = 0, 0
    labels = ids.clone()
    labels[:, :3] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def clone_params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def grads(model: torch.nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(model.parameters()), allow_unused=True))


def assert_update(theta: list[torch.Tensor], model: torch.nn.Module, grad: list[torch.Tensor]) -> None:
    """After an SGD step with lr 1: theta' = theta - grad (None: the parameter got no gradient)."""
    for t, p, g in zip(theta, model.parameters(), grad, strict=True):
        torch.testing.assert_close(p.detach(), t if g is None else t - g, rtol=1e-5, atol=1e-6)


def same_params(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def hook_ids(model: torch.nn.Module) -> list[set[int]]:
    """The forward hooks on the decoder layers (HF installs its own output-capturing ones on first use)."""
    return [set(layer._forward_hooks) for layer in find_layers(model)]


def layer_outputs_with(model: torch.nn.Module, shifts: list[torch.Tensor]):
    """Hooks adding shifts[l] to decoder layer l's output; returns the handles."""
    return [layer.register_forward_hook(lambda _m, _i, out, s=s: out + s)
            for layer, s in zip(find_layers(model), shifts, strict=True)]


ALIGN, HARM = make_batch(1), make_batch(2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors this small gain nothing from intra-op threads, and on a busy 2-core machine they cost 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- Vaccine ----------------------------------------------------------------------------------------------------


def hand_hidden_grads(model: torch.nn.Module, batch: dict) -> list[torch.Tensor]:
    """d loss / d h_l by the zero-shift trick: h_l + z_l with z_l = 0 requiring grad, then grad w.r.t. z_l."""
    with torch.no_grad():
        shapes = [out.shape for out in model(**batch, output_hidden_states=True).hidden_states[1:]]
    zs = [torch.zeros(s, requires_grad=True) for s in shapes]
    handles = layer_outputs_with(model, zs)
    try:
        return list(torch.autograd.grad(model(**batch).loss, zs))
    finally:
        for h in handles:
            h.remove()


def test_vaccine_eps_has_global_norm_rho_along_the_hidden_gradient():
    model, rho = make_model(), 0.7
    g = hand_hidden_grads(model, ALIGN)
    hooks = hook_ids(model)
    _, eps, norm = VaccineStep(rho=rho).perturbation(model, ALIGN, find_layers(model))
    g_norm = math.sqrt(sum(float(x.pow(2).sum()) for x in g))
    assert len(eps) == 2 and float(norm) == pytest.approx(g_norm, rel=1e-5)
    assert math.sqrt(sum(float(e.pow(2).sum()) for e in eps.values())) == pytest.approx(rho, rel=1e-5)
    for e, x in zip(eps.values(), g, strict=True):
        torch.testing.assert_close(e, rho * x / g_norm, rtol=1e-4, atol=1e-8)
    assert hook_ids(model) == hooks


def test_vaccine_update_matches_hand_computed_perturbed_gradient():
    model, rho = make_model(), 0.5
    ref = copy.deepcopy(model)
    theta = clone_params(model)
    stats = VaccineStep(rho=rho).__call__(model, ALIGN, SGDEngine(model, lr=1.0))
    g = hand_hidden_grads(ref, ALIGN)
    norm = math.sqrt(sum(float(x.pow(2).sum()) for x in g))
    handles = layer_outputs_with(ref, [rho * x / norm for x in g])
    loss_p = ref(**ALIGN).loss
    expected = grads(ref, loss_p)
    for h in handles:
        h.remove()
    assert_update(theta, model, expected)
    assert stats["n_backward"] == 2 and stats["perturbed_loss"] == pytest.approx(loss_p.item(), rel=1e-6)
    assert stats["perturbed_loss"] > stats["loss"]  # eps ascends the loss


def test_vaccine_hooks_are_removed_after_the_step_and_after_an_error():
    model = make_model()
    hooks = hook_ids(model)
    VaccineStep(rho=1.0)(model, ALIGN, LocalEngine(model, lr=1e-2))
    clean = make_model(5)
    clean.load_state_dict(model.state_dict())
    assert hook_ids(model) == hooks
    assert torch.equal(model(**ALIGN).logits, clean(**ALIGN).logits)  # bit-for-bit: no eps left behind

    calls = []

    def failing_loss(m, b):  # the probe works, the perturbed forward raises
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return m(**b).loss

    with pytest.raises(RuntimeError, match="boom"):
        VaccineStep(rho=1.0, loss_fn=failing_loss)(model, ALIGN, LocalEngine(model, lr=1e-2))
    assert hook_ids(model) == hooks
    assert torch.equal(model(**ALIGN).logits, clean(**ALIGN).logits)


def test_vaccine_rho_zero_equals_sft_bit_for_bit():
    model = make_model()
    ref = copy.deepcopy(model)
    step, eng, ref_eng = VaccineStep(rho=0.0), LocalEngine(model, lr=1e-2), LocalEngine(ref, lr=1e-2)
    for _ in range(3):
        assert step(model, ALIGN, eng)["n_backward"] == 1
        sft_step(ref, ALIGN, ref_eng)
    assert same_params(model, ref)


def test_vaccine_needs_decoder_layers():
    with pytest.raises(ValueError, match="DecoderLayer"):
        find_layers(torch.nn.Linear(2, 2))
    assert len(find_layers(make_model(), "Attention")) == 2  # the official code's choice of modules


# ---- Booster ----------------------------------------------------------------------------------------------------


def hand_booster_gradient(model: torch.nn.Module, lam: float, alpha: float) -> list[torch.Tensor]:
    g_h = grads(model, model(**HARM).loss)
    norm = torch.sqrt(sum((x * x).sum() for x in g_h))
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        for p, x in zip(shifted.parameters(), g_h, strict=True):
            p.sub_(alpha * x / norm)
    g_hp = grads(shifted, shifted(**HARM).loss)
    g_a = grads(model, model(**ALIGN).loss)
    return [a + lam * (h - hp) for a, h, hp in zip(g_a, g_h, g_hp, strict=True)]


def test_booster_update_is_align_gradient_plus_lam_times_the_harmful_gradient_change():
    model, lam, alpha = make_model(), 5.0, 0.1
    ref = copy.deepcopy(model)
    theta = clone_params(model)
    stats = BoosterStep(lambda: HARM, lam=lam, alpha=alpha)(model, ALIGN, SGDEngine(model, lr=1.0))
    assert_update(theta, model, hand_booster_gradient(ref, lam, alpha))
    assert stats["n_backward"] == 3
    assert stats["harmful_loss"] == pytest.approx(ref(**HARM).loss.item(), rel=1e-6)
    assert stats["harmful_drop"] > 0  # a normalised step down the harmful gradient lowers the harmful loss


def test_booster_probe_restores_theta_bit_for_bit():
    model = make_model()
    before = copy.deepcopy(model)
    d, stats = BoosterStep(lambda: HARM, lam=5.0, alpha=0.5).regulariser_grad(LocalEngine(model, lr=1.0))
    assert same_params(model, before) and all(p.grad is None for p in model.parameters())
    assert len(d) == len(list(model.parameters())) and stats["perturbed_harmful_loss"] < stats["harmful_loss"]


def test_surrogate_adds_exactly_its_direction_to_the_gradient():
    model = make_model()
    d = [torch.randn_like(p) for p in model.parameters()]
    got = grads(model, surrogate(list(model.parameters()), d))
    assert all(torch.equal(a, b) for a, b in zip(got, d, strict=True))


@pytest.mark.parametrize("lam,alpha", [(0.0, 0.1), (5.0, 0.0)])
def test_booster_without_regulariser_equals_sft_bit_for_bit(lam, alpha):
    model = make_model()
    ref = copy.deepcopy(model)
    step, eng, ref_eng = BoosterStep(lambda: HARM, lam=lam, alpha=alpha), LocalEngine(model, 1e-2), LocalEngine(ref, 1e-2)
    for _ in range(3):
        assert step(model, ALIGN, eng)["n_backward"] == 1
        sft_step(ref, ALIGN, ref_eng)
    assert same_params(model, ref)


# ---- RepNoise ---------------------------------------------------------------------------------------------------


def official_mmd(source: torch.Tensor, target: torch.Tensor, kernel_mul: float = 2.0, kernel_num: int = 5) -> torch.Tensor:
    """The official MMD_loss written out (explicit pairwise differences, not the Gram identity)."""
    total = torch.cat([source, target])
    n = total.shape[0]
    dist = ((total.unsqueeze(0) - total.unsqueeze(1)) ** 2).sum(2)
    bandwidth = dist.detach().sum() / (n * n - n) / kernel_mul ** (kernel_num // 2)
    k = sum(torch.exp(-dist / (bandwidth * kernel_mul**i)) for i in range(kernel_num))
    b = source.shape[0]
    return torch.mean(k[:b, :b] + k[b:, b:] - k[:b, b:] - k[b:, :b])


def test_mmd_on_numbers_by_hand():
    x, y = torch.tensor([[0.0], [1.0]]), torch.tensor([[3.0], [3.0]])
    # squared distances: 0-1: 1, 0-3: 9, 1-3: 4, 3-3: 0; bandwidth = (2 * (1 + 9 + 9 + 4 + 4 + 0)) / 12 / 4 = 1.125
    k = lambda d2: sum(math.exp(-d2 / (1.125 * 2**i)) for i in range(5))  # noqa: E731
    xx = (2 * k(0) + 2 * k(1)) / 4
    yy = k(0)
    xy = (2 * k(9) + 2 * k(4)) / 4
    assert float(mmd(x, y)) == pytest.approx(xx + yy - 2 * xy, rel=1e-6)
    torch.manual_seed(0)
    a, b = torch.randn(4, 12), torch.randn(4, 12) + 0.5
    assert float(mmd(a, b)) == pytest.approx(float(official_mmd(a, b)), rel=1e-5)
    assert float(mmd(a, a)) == pytest.approx(0.0, abs=1e-6)


def hand_repnoise(model: torch.nn.Module, alpha: float, beta: float, seed: int, ascent: str = "log") -> dict:
    harmless = model(**ALIGN).loss
    out = model(input_ids=HARM["input_ids"], attention_mask=HARM["attention_mask"], output_hidden_states=True)
    logits, target = out.logits[:, :-1], HARM["labels"][:, 1:]
    harmful = F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1), ignore_index=-100)
    if ascent == "log":
        asc = -torch.log(harmful)
    else:
        keep = target != -100
        p = logits.softmax(-1)[keep].gather(-1, target[keep].unsqueeze(-1)).squeeze(-1)
        asc = -torch.log(1 - p).mean()
    gen, m = torch.Generator().manual_seed(seed), (HARM["labels"] != -100).unsqueeze(-1).float()
    terms = []
    for h in out.hidden_states:
        noise = torch.randn(h.shape, generator=gen) * m
        terms.append(official_mmd((h * m).reshape(h.shape[0], -1), noise.reshape(h.shape[0], -1)))
    noise_mmd = sum(terms) / len(terms)
    assert len(terms) == 3  # embeddings + 2 layers
    return {"loss": harmless, "harmful_loss": harmful, "ascent": asc, "noise_mmd": noise_mmd,
            "total": harmless + beta * asc + alpha * noise_mmd}


@pytest.mark.parametrize("ascent", ["log", "unlikelihood"])
def test_repnoise_components_and_update_match_hand_computed(ascent):
    model, alpha, beta = make_model(), 1.0, 0.5  # a beta large enough that the ascent term shows in the update
    ref = copy.deepcopy(model)
    theta = clone_params(model)
    stats = RepNoiseStep(lambda: HARM, alpha=alpha, beta=beta, ascent=ascent, seed=3)(model, ALIGN, SGDEngine(model, 1.0))
    hand = hand_repnoise(ref, alpha, beta, seed=3, ascent=ascent)
    for key in ("loss", "harmful_loss", "ascent", "noise_mmd", "total"):
        assert stats[key] == pytest.approx(hand[key].item(), rel=1e-5, abs=1e-7), key
    assert_update(theta, model, grads(ref, hand["total"]))
    assert stats["n_backward"] == 1 and stats["n_forward"] == 2 and stats["noise_mmd"] > 0


def test_repnoise_zero_weights_equal_sft_bit_for_bit():
    model = make_model()
    ref = copy.deepcopy(model)
    step, eng, ref_eng = RepNoiseStep(lambda: HARM, alpha=0.0, beta=0.0), LocalEngine(model, 1e-2), LocalEngine(ref, 1e-2)
    for _ in range(3):
        assert step(model, ALIGN, eng)["n_forward"] == 1
        sft_step(ref, ALIGN, ref_eng)
    assert same_params(model, ref)


def test_repnoise_state_dict_resumes_the_same_noise():
    model = make_model()
    a = RepNoiseStep(lambda: HARM, seed=4)
    eng = SGDEngine(model, lr=0.0)  # frozen weights: only the noise changes the MMD
    a(model, ALIGN, eng)
    state = a.state_dict()
    expected = [a(model, ALIGN, eng)["noise_mmd"] for _ in range(2)]
    b = RepNoiseStep(lambda: HARM, seed=0)
    b.load_state_dict(state)
    assert [b(model, ALIGN, eng)["noise_mmd"] for _ in range(2)] == expected
    assert RepNoiseStep(lambda: HARM, seed=4)(model, ALIGN, eng)["noise_mmd"] != expected[0]


# ---- all three reduce their objective under LocalEngine ---------------------------------------------------------


@pytest.mark.parametrize("name", ["vaccine", "booster", "repnoise"])
def test_step_reduces_its_objective_on_a_toy_batch(name):
    model = make_model()
    step = {"vaccine": lambda: VaccineStep(rho=0.1),
            "booster": lambda: BoosterStep(lambda: HARM, lam=5.0, alpha=0.1),
            "repnoise": lambda: RepNoiseStep(lambda: HARM, alpha=1.0, beta=0.001)}[name]()
    objective = {"vaccine": lambda s: s["perturbed_loss"],
                 "booster": lambda s: s["loss"] + 5.0 * s["harmful_drop"],
                 "repnoise": lambda s: s["total"]}[name]
    eng = LocalEngine(model, lr=1e-2)
    values = [objective(step(model, ALIGN, eng)) for _ in range(15)]
    assert values[-1] < values[0] - 0.1 * abs(values[0]), values
