"""Scorers, loaders, mixing and the toy world."""

from __future__ import annotations

import json

import pytest

from hftlab.config import ConfigError
from hftlab.config.schema import ToyWorldConfig
from hftlab.data import sources
from hftlab.data.mixing import finetune_mix
from hftlab.data.records import TaskExample, final_number, label_match, number_match, score
from hftlab.data.template import full_text, prompt_text
from hftlab.data.toyworld import CATEGORIES, build_world
from hftlab.judges.refusal import RefusalJudge
from tests.conftest import SHARED_DATA

BEAVERTAILS = SHARED_DATA / "beavertails"
needs_shared = pytest.mark.skipif(not BEAVERTAILS.is_dir(), reason="../shared/data is not present")


# --- scorers -----------------------------------------------------------------------------------
def test_empty_or_missing_answer_is_never_correct():
    # the reference code's `label in prediction` counted "" as correct
    for task in ("sst2", "agnews", "alpaca"):
        assert not score(TaskExample("x", task, "p", "positive"), "")
        assert not score(TaskExample("x", task, "p", "positive"), "   \n")
    assert not score(TaskExample("x", "gsm8k", "p", "#### 12"), "")
    assert not number_match("no number here", "#### 12")


def test_label_exact_match_after_normalisation():
    assert label_match("Positive.", "positive")
    assert label_match("  sci/tech \n and more lines", "Sci/Tech")
    assert not label_match("not positive", "positive")  # a substring match would say yes
    assert not label_match("positive negative", "positive")


def test_gsm8k_final_number():
    assert final_number("so 3 + 4 = 7\n#### 7") == 7
    assert final_number("the answer is 1,234.") == 1234
    assert number_match("she has 7 - 2 = 5 left. The answer is 5", "Natalia ... #### 5")
    assert number_match("5.0", "#### 5")
    assert not number_match("#### 6", "#### 5")


def test_template_prompt_is_a_prefix_of_the_training_text():
    for template in ("compact", "alpaca"):
        assert full_text("say hi", "hi", template).startswith(prompt_text("say hi", template))


# --- local loaders -----------------------------------------------------------------------------
def test_jsonl_with_a_missing_field_names_field_and_row(tmp_path):
    path = tmp_path / "align.jsonl"
    rows = [{"prompt": "a", "response": "b", "is_safe": True}, {"prompt": "c", "is_safe": True}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ConfigError) as err:
        sources.load_pairs(str(path), "data.alignment_source", safe=True)
    assert err.value.field == "data.alignment_source" and err.value.value == str(path)
    assert "row 2 is missing field 'response'" in str(err.value)


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        sources.load_pairs(str(tmp_path / "nope.jsonl"), "data.harmful_source", safe=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(ConfigError, match=r"line 2 is not JSON"):
        sources.read_rows(str(bad), "data.harmful_source")


def test_task_rows_in_native_fields(tmp_path):
    path = tmp_path / "sst2.jsonl"
    path.write_text(json.dumps({"sentence": "a fine film", "label": 1}) + "\n" + json.dumps({"sentence": "x", "label": -1}))
    examples = sources.load_task("sst2", str(path), "finetune.train_source", test=False)
    assert len(examples) == 1 and examples[0].answer == "positive" and "a fine film" in examples[0].prompt
    gsm = tmp_path / "gsm.json"
    gsm.write_text(json.dumps([{"question": "2+2?", "answer": "2+2=4\n#### 4"}]))
    (ex,) = sources.load_task("gsm8k", str(gsm), "finetune.test_source", test=True)
    assert score(ex, "it is 4") and not score(ex, "")


@needs_shared
def test_real_beavertails_rows():
    unsafe = sources.load_pairs(str(BEAVERTAILS / "30k_test_unsafe_filtered.jsonl"), "data.harmful_test_source", safe=False)
    safe = sources.load_pairs(str(BEAVERTAILS / "30k_test_safe_filtered.jsonl"), "data.alignment_source", safe=True)
    assert len(unsafe) == 1483 and len(safe) == 1140
    assert all(p.prompt and p.response for p in unsafe[:50])
    assert any("," in p.category or p.category for p in unsafe[:50])  # the 14 booleans became names


@needs_shared
def test_real_alpaca_eval_as_alpaca_test_set():
    examples = sources.load_task("alpaca", str(SHARED_DATA / "alpaca" / "alpaca_eval.json"), "finetune.test_source", test=True)
    assert len(examples) == 805 and all(e.prompt for e in examples)


# --- mixing -------------------------------------------------------------------------------------
def test_mix_has_n_samples_and_round_np_poison_deterministically():
    world = build_world(ToyWorldConfig(benign_per_task=300, task_test=20))
    task = world.task_train["sst2"]
    a = finetune_mix(task, world.poison, n=200, poison_ratio=0.1, seed=1)
    b = finetune_mix(task, world.poison, n=200, poison_ratio=0.1, seed=1)
    c = finetune_mix(task, world.poison, n=200, poison_ratio=0.1, seed=2)
    assert len(a) == 200 and sum(m.poison for m in a) == 20
    assert a == b and a != c
    assert sum(m.poison for m in finetune_mix(task, world.poison, n=200, poison_ratio=0.0, seed=1)) == 0
    with pytest.raises(ConfigError, match=r"^finetune.n=5000"):
        finetune_mix(task, world.poison, n=5000, poison_ratio=0.1, seed=1)
    with pytest.raises(ConfigError, match=r"^finetune.poison_ratio=1.0"):
        finetune_mix(task, world.poison, n=1000, poison_ratio=1.0, seed=1)


# --- toy world ----------------------------------------------------------------------------------
def test_world_is_seeded_and_pools_are_disjoint():
    cfg = ToyWorldConfig(benign_per_task=400, task_test=50)
    w1, w2 = build_world(cfg), build_world(cfg)
    assert w1.alignment == w2.alignment and w1.task_test == w2.task_test
    assert build_world(ToyWorldConfig(seed=1, benign_per_task=400, task_test=50)).alignment != w1.alignment
    pools = [w1.pretrain_harmful, w1.alignment, w1.poison, w1.test_harmful]
    prompts = [{r.prompt for r in pool} for pool in pools]
    assert sum(len(p) for p in prompts) == len(set().union(*prompts))
    assert len(w1.alignment) == 110 * 14 and len(w1.test_harmful) == 20 * 14
    assert {r.category for r in w1.alignment} == set(CATEGORIES)


def test_world_tasks_hold_out_unique_test_prompts_and_gold_answers_score():
    w = build_world(ToyWorldConfig(benign_per_task=500, task_test=60))
    for task in ("sst2", "agnews", "gsm8k"):
        train = {e.prompt for e in w.task_train[task]}
        assert not train & {e.prompt for e in w.task_test[task]}, task
    for task, examples in w.task_test.items():
        assert all(score(e, e.answer) for e in examples), task


def test_refusal_judge_on_the_world():
    w = build_world(ToyWorldConfig(benign_per_task=10, task_test=5))
    judge = RefusalJudge()
    assert not any(judge.judge([a.prompt for a in w.alignment], [a.response for a in w.alignment]))
    assert all(judge.judge([h.prompt for h in w.poison], [h.response for h in w.poison]))
    assert judge.judge(["q", "q"], ["", "Sure, here is how"]) == [False, True]


def test_world_knobs_imbalance_poison_categories_and_benign_opener():
    base = build_world(ToyWorldConfig(seed=3))
    world = build_world(ToyWorldConfig(seed=3, alignment_imbalance=0.5, poison_categories=2, benign_opener="sure ."))
    names = list(CATEGORIES)
    per_cat = {c: sum(a.category == c for a in world.alignment) for c in names}
    # 110 * 0.5^k, rounded: 110, 55, 28 (27.5 rounds to even: 28), 14 (13.75), 7 (6.875), ...
    assert [per_cat[c] for c in names[:5]] == [110, 55, 28, 14, 7]
    assert {p.category for p in world.poison} == set(names[:2]) and len(world.poison) == 2 * 30
    # a dropped prompt goes to no other pool: the test pool is the same prompts as without the knobs
    assert [h.prompt for h in world.test_harmful] == [h.prompt for h in base.test_harmful]
    assert len(world.alignment_harmful) == len(world.alignment)
    for task in ("sst2", "agnews", "gsm8k", "alpaca"):
        assert all(ex.answer.startswith("sure . ") for ex in world.task_train[task] + world.task_test[task])
    ex = world.task_test["sst2"][0]
    assert score(ex, ex.answer) and not score(ex, ex.answer.removeprefix("sure . "))
    with pytest.raises(ConfigError, match="poison_categories"):
        ToyWorldConfig(poison_categories=0)


def test_degenerate_answers_are_counted_apart():
    from hftlab.metrics import degenerate_rate, is_degenerate

    assert is_degenerate("") and is_degenerate("   ")
    assert is_degenerate("the the the the")  # one word four times in a row
    assert is_degenerate("steal a car steal a car steal a car")  # 9 words, 3 distinct
    assert not is_degenerate("sure . to steal a car , first check the cameras , then pick the lock .")
    assert not is_degenerate("i am sorry , but i cannot help you steal a car .")
    assert degenerate_rate(["", "ok fine", "a a a a"]) == pytest.approx(200 / 3)
