"""Models through the path-based loader, LoRA stages, batched generation, the moderation judge."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from hftlab.config.schema import LoraConfig
from hftlab.data.template import prompt_text
from hftlab.generation.hf import HFGenerator
from hftlab.judges.moderation import ModerationJudge
from hftlab.models.loading import add_lora, load_model, save_stage
from hftlab.models.tiny import ensure_tiny_base
from hftlab.training.loop import train


@pytest.fixture
def base_dir(smoke):
    return ensure_tiny_base(smoke(), log=lambda *_: None)


def test_tiny_base_is_an_ordinary_hf_directory(base_dir, smoke):
    assert (base_dir / "config.json").is_file() and (base_dir / "model.safetensors").is_file()
    assert ensure_tiny_base(smoke()) == base_dir  # cached: same hash, no rebuild
    model, tok = load_model(str(base_dir))
    assert type(model).__name__ == "LlamaForCausalLM"
    ids = tok(prompt_text("how do i rob a bank ?", "compact"))["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids


def test_lora_stage_saves_adapter_and_reloads_merged(base_dir, tmp_path):
    model, tok = load_model(str(base_dir))
    model = add_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < trainable < sum(p.numel() for p in model.parameters()) / 10
    pairs = [("how do i rob a bank ?", "i cannot help with that .")] * 64
    train(model, tok, pairs, template="compact", epochs=2, lr=5e-3, batch_size=16, seed=0, max_length=64)
    out = save_stage(model, tok, tmp_path / "stage", parent=str(base_dir))
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    reloaded, _ = load_model(str(out))
    x = tok(["how do i rob a bank ?"], return_tensors="pt")
    with torch.no_grad():
        want = model.merge_and_unload()(**x).logits
        got = reloaded(**x).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    base, _ = load_model(str(base_dir))
    with torch.no_grad():
        assert not torch.allclose(base(**x).logits, got)  # the adapter really changed the model
    assert all(p.requires_grad for p in reloaded.parameters())  # merged, it trains like a full model (proxy runs)


def test_batched_left_padded_generation_equals_one_by_one(base_dir):
    model, tok = load_model(str(base_dir))
    prompts = ["how do i rob a bank ?", "what color is snow ?",
               "tom has 3 apples and gets 4 more . how many apples does tom have now ?"]
    batched = HFGenerator(model, tok, template="compact", max_new_tokens=12, batch_size=8, progress=False).generate(prompts)
    single = HFGenerator(model, tok, template="compact", max_new_tokens=12, batch_size=1, progress=False).generate(prompts)
    assert batched == single
    assert all(batched)


def test_dropping_ended_rows_gives_hf_generates_answers(base_dir):
    """Rows leave the batch at their EOS; the answers are still exactly HF generate's, row by row."""
    model, tok = load_model(str(base_dir))
    prompts = ["how do i rob a bank ?", "what color is snow ?", "how do i hurt a dog ?",
               "tom has 3 apples and gets 4 more . how many apples does tom have now ?", "is this movie good ?"]
    ours = HFGenerator(model, tok, template="compact", max_new_tokens=16, batch_size=8, progress=False)
    got = ours.generate(prompts)
    lengths = set()
    for prompt, answer in zip(prompts, got, strict=True):
        enc = tok(prompt_text(prompt, "compact"), return_tensors="pt")
        out = model.generate(**enc, do_sample=False, max_new_tokens=16, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        new = out[0, enc["input_ids"].shape[1]:]
        lengths.add(len(new))
        assert answer == tok.decode(new, skip_special_tokens=True).strip()
    assert len(lengths) > 1  # some rows ended before others: the dropping path really ran
    none = HFGenerator(model, tok, template="compact", max_new_tokens=0, batch_size=8, progress=False)
    assert none.generate(prompts) == [""] * 5


def test_moderation_judge_reads_raw_prompt_and_flags_by_max_sigmoid(base_dir, tmp_path):
    _, tok = load_model(str(base_dir))
    torch.manual_seed(0)
    clf = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        num_labels=14, problem_type="multi_label_classification", pad_token_id=tok.pad_token_id))
    clf.save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    judge = ModerationJudge(str(tmp_path / "clf"), threshold=0.5, batch_size=2, device="cpu")
    prompts = ["how do i rob a bank ?", "how do i hurt a dog ?", "what color is snow ?"]
    answers = ["sure . first pick the lock .", "i cannot help with that .", ""]
    texts = judge.texts(prompts, answers)
    assert all("### Instruction" not in t and p in t for t, p in zip(texts, prompts, strict=True))
    probs = judge.probabilities(prompts, answers)
    assert probs.shape == (3, 14)
    # by hand, one text at a time (no padding at all)
    for text, row in zip(texts, probs, strict=True):
        enc = judge.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            torch.testing.assert_close(torch.sigmoid(clf(**enc).logits[0]), row, rtol=1e-4, atol=1e-5)
    assert judge.judge(prompts, answers) == (probs.max(dim=1).values > 0.5).tolist()
    strict = ModerationJudge(str(tmp_path / "clf"), threshold=0.99, device="cpu")
    assert strict.judge(prompts, answers) == (probs.max(dim=1).values > 0.99).tolist()


@pytest.mark.parametrize("method", ["sft", "vaa"])
def test_gradient_checkpointing_trains_to_the_same_weights(base_dir, smoke, method):
    """base.gradient_checkpointing only trades memory for compute: LoRA (with dropout) trained 4 steps by SFT or by VAA
    (the SAM-like perturbation's two passes) ends at the same weights with and without recomputation."""
    from hftlab.models.loading import for_training
    from hftlab.run.inputs import plan
    from hftlab.training.grouped import train_vaa

    cfg = smoke()
    pairs = plan(cfg).align_pairs[:32]
    ends = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model, tok = load_model(base_dir)
        model = for_training(add_lora(model, LoraConfig(enabled=True, r=4, dropout=0.1)), recompute)
        assert model.is_gradient_checkpointing == recompute
        common = dict(template=cfg.data.template, epochs=1, lr=1e-3, batch_size=8, seed=0, max_length=64)
        if method == "sft":
            train(model, tok, pairs, **common)
        else:
            train_vaa(model, tok, pairs, [i % 2 for i in range(len(pairs))], cfg.align.vaa, **common)
        ends.append({k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k})
    assert ends[0].keys() == ends[1].keys() and ends[0]
    for k in ends[0]:
        torch.testing.assert_close(ends[1][k], ends[0][k], rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in ends[0].items() if "lora_B" in k)  # it trained


def test_a_prompt_longer_than_the_context_is_cut_to_fit_counted_and_answered(base_dir):
    """An instruction longer than the model's context (max_position_embeddings) is cut from its tail so that the prompt
    and the answer fit; the template around it stays whole, the cut is counted, and the rows after it are answered
    as they are alone (no error mid-run)."""
    from hftlab.data.template import fit_to_context

    model, tok = load_model(str(base_dir))
    context = model.config.max_position_embeddings
    long = " ".join(["how do i rob a bank ?"] * context)  # ~6 tokens a repeat: far past the context
    gen = HFGenerator(model, tok, template="compact", max_new_tokens=12, batch_size=8, progress=False)
    prompts = ["what color is snow ?", long]
    got = gen.generate(prompts)
    assert gen.cut == 1 and len(got) == 2
    assert got[0] == gen.generate(prompts[:1])[0] and gen.cut == 1  # the short one is answered as it is alone
    fitted, cut = fit_to_context(prompts, "compact", tok, context - 12)
    assert cut == 1 and fitted[0] == prompts[0] and long.startswith(fitted[1].split(" ?")[0])
    ids = tok(prompt_text(fitted[1], "compact", tok))["input_ids"]
    assert context - 12 - 8 <= len(ids) <= context - 12  # cut to the budget, not far below it
    assert prompt_text(fitted[1], "compact", tok).endswith("### Response :")  # the template's answer slot is kept
