"""Vaccine, Booster, RepNoise and Lisa against their references' updates written out, on a tiny random Llama.

Each reference test recomputes one step (or a few) the way the method's public code computes it, with autograd and
the formula spelled out here (module hooks, masks, kernels), and compares our step's SGD update with it."""

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


ALIGN, HARM = make_batch(1), make_batch(2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors this small gain nothing from intra-op threads, and on a busy 2-core machine they cost 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- Vaccine ----------------------------------------------------------------------------------------------------


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """What git-disl/Vaccine hooks (trainer.py:L36-L50 @ 8937f68): every LlamaAttention, named here by attribute."""
    return [layer.self_attn for layer in model.model.layers]


def shift_outputs(modules: list[torch.nn.Module], shifts: list[torch.Tensor]):
    """Forward hooks adding shifts[m] to module m's output (output[0] for a tuple output); returns the handles."""
    def hook(_m, _i, out, s):
        return (out[0] + s, *out[1:]) if isinstance(out, tuple) else out + s

    return [m.register_forward_hook(lambda m_, i_, o, s=s: hook(m_, i_, o, s)) for m, s in zip(modules, shifts, strict=True)]


def reference_vaccine_grads(model: torch.nn.Module, batch: dict, rho: float, modules) -> tuple[list, float, float]:
    """Vaccine trainer.py:L53-L181 written out: g_m = dL/d(output of m) (first pass), eps_m = rho g_m / (||g|| + 1e-7)
    with ||g|| over all modules (L143-L151), then the gradient of the loss with eps added to the outputs (L111-L134)."""
    with torch.no_grad():
        shapes = []
        handles = [m.register_forward_hook(lambda _m, _i, o: shapes.append((o[0] if isinstance(o, tuple) else o).shape))
                   for m in modules]
        model(**batch)
        for h in handles:
            h.remove()
    zs = [torch.zeros(s, requires_grad=True) for s in shapes]  # dL/dz at z = 0 is dL/d(output)
    handles = shift_outputs(modules, zs)
    g = list(torch.autograd.grad(model(**batch).loss, zs))
    for h in handles:
        h.remove()
    norm = torch.linalg.vector_norm(torch.stack([x.norm(p=2) for x in g]))
    handles = shift_outputs(modules, [x * (rho / (norm + 1e-7)) for x in g])
    loss_p = model(**batch).loss
    out = grads(model, loss_p)
    for h in handles:
        h.remove()
    return out, float(norm), loss_p.item()


def hook_ids(model: torch.nn.Module) -> list[set[int]]:
    """The forward hooks on the attention modules and decoder layers (HF installs its own capturing ones on first use)."""
    return [set(m._forward_hooks) for m in [*find_layers(model, "Attention"), *find_layers(model)]]


@pytest.mark.parametrize("suffix", ["Attention", "DecoderLayer"])
def test_vaccine_update_matches_the_reference_written_out(suffix):
    model, rho = make_model(), 0.5
    ref = copy.deepcopy(model)
    theta = clone_params(model)
    stats = VaccineStep(rho=rho, module_suffix=suffix)(model, ALIGN, SGDEngine(model, lr=1.0))
    modules = attention_modules(ref) if suffix == "Attention" else list(ref.model.layers)
    expected, norm, loss_p = reference_vaccine_grads(ref, ALIGN, rho, modules)
    assert_update(theta, model, expected)
    assert stats["hidden_grad_norm"] == pytest.approx(norm, rel=1e-5)
    assert stats["n_backward"] == 2 and stats["perturbed_loss"] == pytest.approx(loss_p, rel=1e-6)
    assert stats["perturbed_loss"] > stats["loss"]  # eps ascends the loss


def test_vaccine_defaults_to_the_attention_modules_and_config_selects():
    from hftlab.config.schema import AlignConfig, VaccineConfig
    from hftlab.training.methods import build_step

    assert VaccineStep().module_suffix == "Attention" and VaccineConfig().layers == "attention"
    model = make_model()
    eng = LocalEngine(model, lr=1e-2)
    assert build_step(AlignConfig(method="vaccine"), eng).module_suffix == "Attention"
    decoder = AlignConfig(method="vaccine", vaccine=VaccineConfig(layers="decoder"))
    assert build_step(decoder, eng).module_suffix == "DecoderLayer"
    assert find_layers(model, "Attention") == attention_modules(model)


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


def test_vaccine_needs_the_modules_it_hooks():
    with pytest.raises(ValueError, match="DecoderLayer"):
        find_layers(torch.nn.Linear(2, 2))
    assert len(find_layers(make_model(), "Attention")) == 2


# ---- Booster ----------------------------------------------------------------------------------------------------


def reference_booster_gradient(model: torch.nn.Module, lam: float, alpha: float) -> list[torch.Tensor]:
    """Booster trainer.py:L272-L386 @ 6421918 written out: g_h, theta - alpha g_h / (||g_h|| + 1e-7), g_h' there,
    g_a at theta, grad = g_a + lamb g_h - lamb g_h'."""
    g_h = grads(model, model(**HARM).loss)
    norm = torch.linalg.vector_norm(torch.stack([x.norm(p=2) for x in g_h])) + 1e-7
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        for p, x in zip(shifted.parameters(), g_h, strict=True):
            p.sub_(alpha * x / norm)
    g_hp = grads(shifted, shifted(**HARM).loss)
    g_a = grads(model, model(**ALIGN).loss)
    return [a + lam * h - lam * hp for a, h, hp in zip(g_a, g_h, g_hp, strict=True)]


def test_booster_update_matches_the_reference_written_out():
    model, lam, alpha = make_model(), 5.0, 0.1
    ref = copy.deepcopy(model)
    theta = clone_params(model)
    stats = BoosterStep(lambda: HARM, lam=lam, alpha=alpha)(model, ALIGN, SGDEngine(model, lr=1.0))
    assert_update(theta, model, reference_booster_gradient(ref, lam, alpha))
    assert stats["n_backward"] == 3
    assert stats["harmful_loss"] == pytest.approx(ref(**HARM).loss.item(), rel=1e-6)
    assert stats["harmful_drop"] > 0  # a normalised step down the harmful gradient lowers the harmful loss


def test_booster_harmful_batch_size_reaches_the_side_stream():
    from hftlab.config.schema import AlignConfig, BoosterConfig
    from hftlab.training.methods import method_of

    def side_batch_size(stage):
        return method_of(stage).side_batch_size(stage)

    assert side_batch_size(AlignConfig(method="booster", batch_size=32)) == 32
    assert side_batch_size(AlignConfig(method="booster", booster=BoosterConfig(harmful_batch_size=10))) == 10


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
    """representation-noising loss.py:L17-L49 written out (explicit pairwise differences, not the Gram identity)."""
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


def masked_token_ce(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """loss.py:L52-L71 written out: logits * mask[:-1], targets ids[1:] * mask[1:], target 0 ignored, mean."""
    lg = logits[:, :-1] * mask[:, :-1, None]
    target = ids[:, 1:] * mask[:, 1:]
    target = torch.where(target == 0, torch.full_like(target, -100), target)
    return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), target.reshape(-1), ignore_index=-100)


def reference_repnoise(model, harmless: dict, harmful: dict, alpha: float, beta: float, seed: int, mask: str) -> dict:
    """rep_noise_loss, loss.py:L74-L130 @ 03689ff written out. mask="differ": the reference's mask (L93);
    "response": ours, the harmful answer tokens, with the harmless term the plain answer-token cross-entropy."""
    acts = {}
    handles = [layer.mlp.register_forward_hook(lambda _m, _i, o, i=i: acts.__setitem__(i, o))
               for i, layer in enumerate(model.model.layers)]
    out = model(input_ids=harmful["input_ids"], attention_mask=harmful["attention_mask"], output_hidden_states=True)
    for h in handles:
        h.remove()
    if mask == "differ":
        m = (harmful["input_ids"] != harmless["input_ids"]).long()

        def ce(logits):
            return masked_token_ce(logits, harmful["input_ids"], m)

        harmless_loss = masked_token_ce(model(input_ids=harmless["input_ids"], attention_mask=harmless["attention_mask"]).logits,
                                        harmless["input_ids"], m)
    else:
        m = (harmful["labels"] != -100).long()

        def ce(logits):
            return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), harmful["labels"][:, 1:].reshape(-1), ignore_index=-100)

        harmless_loss = model(**harmless).loss
    gen = torch.Generator().manual_seed(seed)  # our step's noise source: the same draws, layer by layer
    noise_loss = 0
    for i in range(len(model.model.layers)):
        hidden = acts[i] * m[..., None]
        gaussian = torch.randn(hidden.shape, generator=gen) * m[..., None]
        noise_loss = noise_loss + official_mmd(hidden.reshape(len(hidden), -1), gaussian.reshape(len(hidden), -1))
    noise_loss = noise_loss / len(model.model.layers)
    harmful_losses = ce(out.logits)
    final = harmful_losses
    for h in out.hidden_states:  # the logit lens of every hidden state through the final norm and lm_head
        harmful_losses = harmful_losses + ce(model.lm_head(model.model.norm(h)))
    harmful_losses = harmful_losses / len(out.hidden_states) + 1
    assert len(out.hidden_states) == 3  # embeddings, layer 0, the normed last layer
    total = harmless_loss + beta * noise_loss - alpha * torch.log(harmful_losses)
    return {"loss": harmless_loss, "harmful_loss": final, "lens_loss": harmful_losses - 1, "noise_mmd": noise_loss,
            "ascent": -torch.log(harmful_losses), "total": total}


def paired_batches() -> tuple[dict, dict]:
    """A harmless and a harmful batch on the same prompts (3 tokens), answers differing; one target id is 0."""
    harmless, harmful = make_batch(11), make_batch(12)
    harmful["input_ids"][:, :3] = harmless["input_ids"][:, :3]
    harmful["input_ids"][-1, -2:] = harmless["input_ids"][-1, -2:]  # shared padding
    harmful["attention_mask"] = harmless["attention_mask"].clone()
    harmful["input_ids"][0, 5] = 0  # a token id 0 inside the mask: the reference ignores it as a target
    for b in (harmless, harmful):
        b["labels"] = torch.where(b["attention_mask"] == 1, b["input_ids"], torch.full_like(b["input_ids"], -100))
        b["labels"][:, :3] = -100
    return harmless, harmful


@pytest.mark.parametrize("mask", ["response", "differ"])
def test_repnoise_update_matches_the_reference_written_out(mask):
    """alpha and beta distinct, so a swap of the two weights (beta on the log, alpha on the MMD) would show."""
    model, alpha, beta = make_model(), 0.7, 0.3
    harmless, harmful = paired_batches() if mask == "differ" else (ALIGN, HARM)
    ref = copy.deepcopy(model)
    theta = clone_params(model)
    step = RepNoiseStep(lambda: harmful, alpha=alpha, beta=beta, mask=mask, seed=3)
    stats = step(model, harmless, SGDEngine(model, 1.0))
    want = reference_repnoise(ref, harmless, harmful, alpha, beta, seed=3, mask=mask)
    for key in ("loss", "harmful_loss", "lens_loss", "ascent", "noise_mmd", "total"):
        assert stats[key] == pytest.approx(want[key].item(), rel=1e-5, abs=1e-7), key
    assert stats["total"] == pytest.approx(stats["loss"] + beta * stats["noise_mmd"] + alpha * stats["ascent"], rel=1e-6)
    assert_update(theta, model, grads(ref, want["total"]))
    assert stats["n_backward"] == 1 and stats["n_forward"] == 2 and stats["noise_mmd"] > 0


def test_repnoise_defaults_are_the_reference_weights():
    """alpha = 1 on -log(L_lens + 1), beta = 0.001 on the MMD (loss.py:L76, L129), through the config and build_step."""
    from hftlab.config.schema import AlignConfig
    from hftlab.training.methods import build_step

    model = make_model()
    step = build_step(AlignConfig(method="repnoise"), SGDEngine(model, 1e-3), side=lambda: HARM, seed=3)
    assert (step.alpha, step.beta, step.mask) == (1.0, 0.001, "response")
    ref = copy.deepcopy(model)
    stats = step(model, ALIGN, SGDEngine(model, 1e-3))
    want = reference_repnoise(ref, ALIGN, HARM, 1.0, 0.001, seed=3, mask="response")
    assert stats["total"] == pytest.approx(want["total"].item(), rel=1e-6)
    assert stats["total"] == pytest.approx(stats["loss"] + 0.001 * stats["noise_mmd"] + stats["ascent"], rel=1e-6)


def test_repnoise_paired_side_pairs_answer_the_same_prompts():
    from hftlab.config import load_config
    from hftlab.run.inputs import plan, side_pairs
    from tests.conftest import REPO

    cfg = load_config(REPO / "configs" / "smoke.yaml", ["align.method=repnoise", "align.repnoise.paired=true",
                                                        "align.repnoise.mask=differ", "tracking.enabled=false"])
    p = plan(cfg)
    side = side_pairs(cfg.align, p)
    assert [q for q, _ in side] == [q for q, _ in p.align_pairs]
    harmful = {h.prompt: h.response for h in p.defense_harmful}
    matched = [(q, r) for q, r in side if q in harmful]
    assert len(matched) == len(p.alignment) and all(r == harmful[q] for q, r in matched)
    benign = side[len(p.alignment):]  # benign rows have no harmful answer: paired with themselves
    assert benign == p.align_pairs[len(p.alignment):]


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


# ---- Lisa -------------------------------------------------------------------------------------------------------


def reference_lisa(model: torch.nn.Module, user: list[dict], align: list[dict], rho: float, a_steps: int, f_steps: int,
                   proximal_after: float, lr: float) -> list[str]:
    """git-disl/Lisa LisaTrainer (trainer.py:L78-L209 @ 68e3659) written out with SGD: check_mode, switch_model, the
    proximal term toward the other phase's weights, none while steps <= proximal_after. Returns the phases."""
    params = [p for p in model.parameters() if p.requires_grad]
    status = "alignment"
    alignment_w = [p.detach().clone() for p in params]
    finetune_w = [p.detach().clone() for p in params]
    clock = steps = 0
    align_iter = iter(align)
    phases = []
    for batch in user:
        if status == "alignment":
            if clock % a_steps == 0 and steps != 0:
                status = "finetune"
                alignment_w = [p.detach().clone() for p in params]
                clock = 0
            else:
                batch = next(align_iter)
        elif clock % f_steps == 0 and steps != 0:
            status = "alignment"
            finetune_w = [p.detach().clone() for p in params]
            batch = next(align_iter)
            clock = 0
        loss = model(**batch).loss
        if steps > proximal_after:
            anchor = finetune_w if status == "alignment" else alignment_w
            for p, w in zip(params, anchor, strict=True):
                loss = loss + rho / 2 * torch.norm(p - w) ** 2
        g = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, x in zip(params, g, strict=True):
                p.sub_(lr * x)
        phases.append(status)
        steps += 1
        clock += 1
    return phases


def test_lisa_matches_the_reference_written_out():
    from hftlab.algorithms.lisa import LisaStep

    model, rho, lr = make_model(), 0.5, 0.05
    user = [make_batch(20 + i) for i in range(9)]
    align = [make_batch(40 + i) for i in range(9)]
    ref = copy.deepcopy(model)
    phases = reference_lisa(ref, user, align, rho, 2, 3, proximal_after=1, lr=lr)
    stream = iter(align)
    step = LisaStep(lambda: next(stream), list(model.parameters()), rho=rho, alignment_steps=2, finetune_steps=3,
                    proximal_from=1)
    eng = SGDEngine(model, lr=lr)
    stats = [step(model, b, eng) for b in user]
    assert phases == ["alignment"] * 2 + ["finetune"] * 3 + ["alignment"] * 2 + ["finetune"] * 2
    assert [s["phase"] for s in stats] == [float(p == "alignment") for p in phases]
    assert math.isnan(stats[1]["proximal"]) and stats[2]["proximal"] == 0  # off while steps <= 1; anchor = theta
    assert stats[3]["proximal"] > 0
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


def test_lisa_state_dict_resumes_phase_and_anchors():
    from hftlab.algorithms.lisa import LisaStep

    user = [make_batch(60 + i) for i in range(8)]

    def run(split: int | None):
        model = make_model()
        stream = iter([make_batch(80 + i) for i in range(8)])
        step = LisaStep(lambda: next(stream), list(model.parameters()), rho=1.0, alignment_steps=2, finetune_steps=2)
        eng = SGDEngine(model, lr=0.05)
        for i, b in enumerate(user):
            if i == split:  # a fresh step object with the saved state, as after a resume
                state = copy.deepcopy(step.state_dict())
                step = LisaStep(lambda: next(stream), list(model.parameters()), rho=1.0, alignment_steps=2,
                                finetune_steps=2)
                step.load_state_dict(state)
            step(model, b, eng)
        return model

    assert same_params(run(None), run(5))


# ---- all of them reduce their objective under LocalEngine -------------------------------------------------------


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
