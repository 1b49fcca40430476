"""Hostile and malformed input, fuzzed (hypothesis): every loader answers a ConfigError naming the file or the dotted
field, never a traceback from inside, and nothing on disk changes. A fixed budget per loader (MAX_EXAMPLES) keeps
the suite's time in bounds; docs/reliability.md has the counts. Run with --hypothesis-show-statistics to see them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hftlab.config.errors import ConfigError
from hftlab.config.loader import load_config
from hftlab.data.prompt_sets import load_prompt_set, load_safe_set
from hftlab.data.sources import load_pairs, load_task
from hftlab.data.splits import load_labeled
from hftlab.run.pipeline import read_groups
from hftlab.sweep.spec import load_sweep

from .conftest import REPO

MAX_EXAMPLES = 60
FUZZ = settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=40))
json_values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                                                              max_size=4), max_leaves=12)
FIELDS = ["prompt", "response", "is_safe", "category", "id", "group", "label", "sentence", "text", "question", "answer",
          "instruction", "output", "input", "context", "functional_category"]
rows = st.one_of(json_values, st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6))


@st.composite
def jsonl_bytes(draw) -> bytes:
    """Lines of rows, then maybe a corruption: a cut last line, bytes that are not UTF-8, a stray non-JSON line."""
    lines = [json.dumps(r) for r in draw(st.lists(rows, max_size=6))]
    text = "\n".join(lines).encode()
    corrupt = draw(st.sampled_from(["none", "cut", "latin1", "garbage", "empty"]))
    if corrupt == "cut" and text:
        text = text[: draw(st.integers(0, len(text) - 1))]
    elif corrupt == "latin1":
        text += "\ncafé".encode("latin-1")
    elif corrupt == "garbage":
        text += b"\n" + draw(st.binary(max_size=30))
    elif corrupt == "empty":
        text = b""
    return text


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def answers_cleanly(call, path: Path, *, names: str | None = None) -> None:
    """`call()` returns, or raises a one-line-cause ConfigError that names `names` (default the file); no other
    exception escapes, and the directory holding the file is byte for byte as it was."""
    before = snapshot(path.parent)
    try:
        call()
    except ConfigError as err:
        assert (names or str(path)) in str(err), str(err)
    assert snapshot(path.parent) == before


BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n" \
       "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n" \
       "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n"


@FUZZ
@given(body=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                      st.dictionaries(st.sampled_from(["name", "seed", "align", "finetune", "eval", "data", "base", "x"]),
                                      json_values, max_size=5).map(lambda d: json.dumps(d).encode())))
@example(body=BOMB.encode())  # a "billion laughs": 10^6 values from 60 characters
@example(body=b"seed: !!python/object/apply:os.system ['echo pwned']\n")
@example(body=b"name: " + "é".encode("latin-1"))
@example(body=b"[" * 5000)
@example(body=b"")
def test_config_files(tmp_path_factory, body):
    path = tmp_path_factory.mktemp("cfg") / "config.yaml"
    path.write_bytes(body)
    answers_cleanly(lambda: load_config(path), path)


@FUZZ
@given(item=st.text(max_size=60))
@example(item="align.lr=[" * 3000)
@example(item="=1")
@example(item="align=3")
@example(item="align.lr.x=1")
def test_dotted_overrides(tmp_path, item):
    try:
        load_config(REPO / "configs" / "smoke.yaml", [item])
    except ConfigError as err:
        assert str(err).split("=")[0], str(err)  # a dotted field first


@FUZZ
@given(body=st.dictionaries(st.sampled_from(["name", "config", "space", "metric", "mode", "num_samples", "seeds",
                                             "resources", "scheduler", "report", "x"]), json_values, max_size=6))
@example(body={"config": "configs/smoke.yaml", "space": {"align.lr": {"grid": []}}})
@example(body={"config": "configs/smoke.yaml", "space": {"nope.key": {"grid": [1]}}})
def test_sweep_files(tmp_path_factory, body):
    path = tmp_path_factory.mktemp("sweep") / "sweep.yaml"
    path.write_text(json.dumps(body))
    before = snapshot(path.parent)
    try:
        load_sweep(path)
    except ConfigError as err:
        assert "=" in str(err)  # dotted field=value, whichever part of the sweep it is
    assert snapshot(path.parent) == before


def _jsonl_case(tmp_path_factory, body: bytes, suffix: str = ".jsonl") -> Path:
    path = tmp_path_factory.mktemp("data") / f"rows{suffix}"
    path.write_bytes(body)
    return path


@FUZZ
@given(body=jsonl_bytes())
@example(body=b'{"id": "a", "group": 1}\n{"id": "b", "gro')
@example(body=b'{"id": "a", "group": true}\n')
def test_group_files(tmp_path_factory, body):
    path = _jsonl_case(tmp_path_factory, body)
    answers_cleanly(lambda: read_groups(str(path)), path)


@FUZZ
@given(body=jsonl_bytes(), safe=st.booleans())
@example(body=b'{"prompt": "' + b"x" * (3 * 2**20) + b'", "response": "y"}\n', safe=False)  # a 3 MB line
def test_beavertails_rows(tmp_path_factory, body, safe):
    path = _jsonl_case(tmp_path_factory, body)
    answers_cleanly(lambda: load_pairs(str(path), "data.alignment_source", safe=safe), path)


@FUZZ
@given(body=jsonl_bytes())
def test_labeled_files(tmp_path_factory, body):
    path = _jsonl_case(tmp_path_factory, body)
    answers_cleanly(lambda: load_labeled([str(path)], "eval.judge.train.corpus"), path)


@FUZZ
@given(body=jsonl_bytes(), safe=st.booleans())
def test_prompt_set_files(tmp_path_factory, body, safe):
    path = _jsonl_case(tmp_path_factory, body)
    load = load_safe_set if safe else load_prompt_set
    answers_cleanly(lambda: load(str(path), str(path.parent)), path)


@FUZZ
@given(rows_=st.lists(rows, max_size=5), task=st.sampled_from(["alpaca", "sst2", "agnews", "gsm8k"]),
       form=st.sampled_from(["json", "jsonl", "cut"]))
@example(rows_=[{"sentence": "ok", "label": 7}], task="sst2", form="json")
@example(rows_=[{"sentence": "ok", "label": "positive"}], task="sst2", form="jsonl")
@example(rows_=[{"text": "ok", "label": 1e300}], task="agnews", form="json")
def test_task_files(tmp_path_factory, rows_, task, form):
    """AlpacaEval (a .json list) and local task files (.json or .jsonl)."""
    if form == "json":
        path = _jsonl_case(tmp_path_factory, json.dumps(rows_).encode(), ".json")
    else:
        body = "\n".join(json.dumps(r) for r in rows_).encode()
        path = _jsonl_case(tmp_path_factory, body[: len(body) // 2] if form == "cut" else body)
    answers_cleanly(lambda: load_task(task, str(path), "finetune.train_source", test=False), path)


@pytest.mark.parametrize("name", ["alpaca/alpaca_eval.json", "beavertails/30k_test_unsafe_filtered.jsonl"])
def test_the_real_files_still_load(name):
    from .conftest import SHARED_DATA

    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is not here (../shared/data)")
    if name.startswith("alpaca"):
        assert len(load_task("alpaca", str(path), "finetune.train_source", test=False)) > 100
    else:
        assert len(load_pairs(str(path), "data.alignment_source", safe=False)) > 100


TEN_MB = b'{"prompt": "' + b"x" * (10 * 2**20) + b'", "response": "y", "is_safe": false, "category": "c"}\n'


@pytest.mark.parametrize("loader", ["beavertails", "labeled", "prompts", "safe prompts", "groups", "task"])
def test_a_10_mb_line_is_one_line_naming_the_file_and_the_line(tmp_path, loader):
    """A 10 MB line (a broken or hostile file) in every JSON-lines reader: one ConfigError line, no traceback."""
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"prompt": "p", "response": "r", "is_safe": true, "category": "c"}\n' + TEN_MB)
    calls = {"beavertails": lambda: load_pairs(str(path), "data.alignment_source", safe=False),
             "labeled": lambda: load_labeled([str(path)], "eval.judge.train.corpus"),
             "prompts": lambda: load_prompt_set(str(path), str(path.parent)),
             "safe prompts": lambda: load_safe_set(str(path), str(path.parent)),
             "groups": lambda: read_groups(str(path)),
             "task": lambda: load_task("alpaca", str(path), "finetune.train_source", test=False)}
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError) as err:
        calls[loader]()
    message = str(err.value)
    assert str(path) in message and "line 2 is 10.0 MB" in message and "\n" not in message, message[:300]
    assert snapshot(tmp_path) == before


def test_a_model_that_needs_its_own_code_is_one_line_naming_base_trust_remote_code(tmp_path):
    """A model directory whose config maps to code in the directory (`auto_map`): refused with one line naming the
    setting, and its code never runs."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from hftlab.models.loading import load_model

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "hi": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>").save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "hftlab-custom", "architectures": ["CustomForCausalLM"],
        "auto_map": {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomForCausalLM"}}))
    ran = tmp_path / "the-custom-code-ran"
    (tmp_path / "custom.py").write_text(f"open({str(ran)!r}, 'w').close()\n")
    with pytest.raises(ConfigError) as err:
        load_model(tmp_path)
    message = str(err.value)
    assert err.value.field == "base.trust_remote_code" and str(tmp_path) in message and "\n" not in message, message
    assert "base.trust_remote_code=true" in message and not ran.exists()
