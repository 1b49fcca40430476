"""The field's harmful-request sets, by name, as HS test prompts (eval.prompt_sets), and its safe sets for
over-refusal (eval.refusal_sets: XSTest's safe prompts, JailbreakBench's benign behaviors).

`beavertails` is the run's own HS test prompts (the split's, or the toy world's); the others are read from
eval.prompts_dir (../shared/data/prompts: AdvBench, HarmBench, StrongREJECT, SimpleSafetyTests, JailbreakBench), or
any local .json/.jsonl file of rows with a `prompt` (its name is the file's stem). HarmBench: its standard and
contextual behaviors (a contextual one asks about a given text: the request first, then the text, so a judge that reads
the prompt's first tokens sees the request); its copyright behaviors are left out (HarmBench judges them by hashing
against the books, not by a classifier). Data only: no model is touched here.
"""

from __future__ import annotations

from pathlib import Path

from hftlab.config.errors import ConfigError
from hftlab.config.evaluation import PROMPT_SETS, REFUSAL_SETS
from hftlab.data.records import HarmfulPair
from hftlab.data.sources import read_rows

OWN = "beavertails"
FILES = {"advbench": "advbench.jsonl", "harmbench": "harmbench.jsonl", "strongreject": "strongreject.jsonl",
         "simplesafetytests": "simplesafetytests.jsonl", "jbb": "jbb_harmful.jsonl"}
KNOWN = PROMPT_SETS
assert set(KNOWN) == {OWN, *FILES}
FIELD = "eval.prompt_sets"


def is_file_name(name: str) -> bool:
    return name.endswith((".json", ".jsonl"))


def set_name(name: str) -> str:
    """A set's name in metrics: the name, or a file's stem."""
    return Path(name).stem if is_file_name(name) else name


SAFE_FILES = {"xstest": "xstest.jsonl", "jbb_benign": "jbb_benign.jsonl"}
assert set(REFUSAL_SETS) == set(SAFE_FILES)


def set_path(name: str, prompts_dir: str, files: dict[str, str] = FILES, field: str = FIELD) -> Path:
    """The file a named set or a local file is read from; raises ConfigError for an unknown name or a missing file."""
    if is_file_name(name):
        path = Path(name)
    elif name in files:
        path = Path(prompts_dir) / files[name]
    else:
        raise ConfigError(field, name, f"is not a known prompt set {list(files)} nor a .json/.jsonl file")
    if not path.is_file():
        raise ConfigError(field, name, f"no such file: {path}" + (" (eval.prompts_dir)" if name in files else ""))
    return path


def load_prompt_set(name: str, prompts_dir: str) -> list[HarmfulPair]:
    """A set's prompts as HarmfulPair (no response: HS needs none), ids `<set>-<row>`."""
    path = set_path(name, prompts_dir)
    out = []
    for n, row in enumerate(read_rows(str(path), FIELD), start=1):
        if not isinstance(row, dict) or not str(row.get("prompt") or "").strip():
            raise ConfigError(FIELD, name, f"{path} row {n} has no prompt")
        if row.get("functional_category") == "copyright":
            continue
        prompt = str(row["prompt"])
        if row.get("context"):
            prompt = f"{prompt}\n\n{row['context']}"
        out.append(HarmfulPair(f"{set_name(name)}-{n}", prompt, "", str(row.get("category") or "")))
    if not out:
        raise ConfigError(FIELD, name, f"{path} has no prompts")
    return out


def load_safe_set(name: str, prompts_dir: str) -> list[str]:
    """A safe set's prompts (XSTest: its `safe`-labeled rows only; its unsafe contrasts are HS-like, not over-refusal)."""
    field = "eval.refusal_sets"
    path = set_path(name, prompts_dir, SAFE_FILES, field)
    out = []
    for n, row in enumerate(read_rows(str(path), field), start=1):
        if not isinstance(row, dict) or not str(row.get("prompt") or "").strip():
            raise ConfigError(field, name, f"{path} row {n} has no prompt")
        if row.get("label", "safe") == "safe":
            out.append(str(row["prompt"]))
    if not out:
        raise ConfigError(field, name, f"{path} has no safe prompts")
    return out
