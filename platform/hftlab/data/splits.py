"""Labeled safety rows (BeaverTails format) cut disjointly by prompt into the pools a real-data run needs.

Why by prompt: a prompt seen in training must never be a test prompt, or HS (and a judge's accuracy) measures
memory. The rows are grouped by normalized prompt (records.prompt_key: case, punctuation and spacing dropped), and each
prompt with all its rows goes to exactly one pool:

- `contrast`: prompts answered both safely and unsafely (97 in the local BeaverTails rows). Only the response
  tells their rows apart, so they are the judge's hardest test; no judge ever trains on them. A share
  (`contrast_alignment`) gives its safe answer to the alignment pool: safe answers to harmful prompts are scarce.
- `hs_test`: prompts with only unsafe answers, held out as the HS test prompts.
- `judge_test`: a share of the other prompts, held out to evaluate judges (nothing trains on them).
- `train`: the rest. Their safe rows are the alignment pool, their unsafe rows the poison pool (and the harmful
  prompts for distilled refusals), and all their rows train the moderation judge.

The split depends on the rows and `data.split` only (not the run's seed), so every run of a study shares it;
`write()` records each pool's ids with the run.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from hftlab.config.data import SplitConfig
from hftlab.config.errors import ConfigError
from hftlab.data.records import AlignmentPair, HarmfulPair, prompt_key
from hftlab.data.sources import category_of, read_rows


@dataclass(frozen=True)
class LabeledRow:
    """One (prompt, response) with its human label: True = the response is safe."""

    id: str
    prompt: str
    response: str
    is_safe: bool
    category: str = ""


@dataclass
class Split:
    """The pools, each a list of rows whose prompts no other pool has."""

    train: list[LabeledRow] = field(default_factory=list)
    hs_test: list[LabeledRow] = field(default_factory=list)
    judge_test: list[LabeledRow] = field(default_factory=list)
    contrast: list[LabeledRow] = field(default_factory=list)
    contrast_alignment_prompts: set[str] = field(default_factory=set)

    def alignment(self) -> list[AlignmentPair]:
        """Safe answers: the train pool's, then those of the contrast prompts given to alignment."""
        rows = [r for r in self.train if r.is_safe]
        rows += [r for r in self.contrast if r.is_safe and r.prompt in self.contrast_alignment_prompts]
        return [AlignmentPair(r.id, r.prompt, r.response, r.category) for r in rows]

    def poison(self) -> list[HarmfulPair]:
        """Unsafe (prompt, answer) pairs of the train pool: the attack's harmful data."""
        return [HarmfulPair(r.id, r.prompt, r.response, r.category) for r in self.train if not r.is_safe]

    def test_prompts(self) -> list[HarmfulPair]:
        """The HS test prompts (with the unsafe answer the human labels came with), one per normalized prompt."""
        first: dict[str, LabeledRow] = {}
        for r in self.hs_test:
            first.setdefault(prompt_key(r.prompt), r)
        rows = list(first.values())
        return [HarmfulPair(r.id, r.prompt, r.response, r.category) for r in rows]

    def judge_train(self) -> list[LabeledRow]:
        """Rows a judge may train on: the train pool only."""
        return list(self.train)

    def summary(self) -> dict[str, int]:
        return {"train_rows": len(self.train), "alignment_pairs": len(self.alignment()), "poison_pairs": len(self.poison()),
                "hs_test_prompts": len(self.hs_test), "judge_test_rows": len(self.judge_test),
                "contrast_rows": len(self.contrast), "contrast_alignment_prompts": len(self.contrast_alignment_prompts)}

    def write(self, path: str | Path) -> None:
        """Each pool's row ids (and the contrast prompts given to alignment) as JSON: what this run's split was."""
        pools = {name: [r.id for r in getattr(self, name)] for name in ("train", "hs_test", "judge_test", "contrast")}
        pools["contrast_alignment"] = sorted(r.id for r in self.contrast if r.prompt in self.contrast_alignment_prompts)
        Path(path).write_text(json.dumps({"summary": self.summary(), "pools": pools}))


def row_id(prompt: str, response: str) -> str:
    """A stable id from the content: the same row has the same id in every file and every run."""
    return "bt-" + hashlib.sha1(f"{prompt}\x00{response}".encode()).hexdigest()[:12]


def load_labeled(sources: list[str], field_name: str = "data.split.sources") -> list[LabeledRow]:
    """Every row of the sources (local files or HF names), each needing prompt, response and is_safe."""
    rows, seen = [], set()
    for source in sources:
        for n, row in enumerate(read_rows(source, field_name), start=1):
            if not isinstance(row, dict) or any(row.get(k) is None for k in ("prompt", "response", "is_safe")):
                raise ConfigError(field_name, source, f"row {n} needs prompt, response and is_safe")
            rid = row_id(str(row["prompt"]), str(row["response"]))
            if rid not in seen:
                seen.add(rid)
                rows.append(LabeledRow(rid, str(row["prompt"]), str(row["response"]), bool(row["is_safe"]), category_of(row)))
    return rows


def split_rows(rows: list[LabeledRow], cfg: SplitConfig) -> Split:
    """Cut `rows` by prompt into the pools (see the module docstring); raises ConfigError if a pool cannot be filled."""
    by_prompt: dict[str, list[LabeledRow]] = {}  # by normalized prompt: "Can X?" and "can x" are one prompt
    for r in rows:
        by_prompt.setdefault(prompt_key(r.prompt), []).append(r)
    contrast, unsafe_only, safe_only = [], [], []
    for prompt in sorted(by_prompt):
        labels = {r.is_safe for r in by_prompt[prompt]}
        (contrast if len(labels) == 2 else safe_only if labels == {True} else unsafe_only).append(prompt)
    rng = random.Random(cfg.seed)
    for prompts in (contrast, unsafe_only, safe_only):
        rng.shuffle(prompts)
    if cfg.hs_test > len(unsafe_only):
        raise ConfigError("data.split.hs_test", cfg.hs_test, f"the rows have {len(unsafe_only)} prompts with only unsafe answers")
    hs_test, unsafe_rest = unsafe_only[: cfg.hs_test], unsafe_only[cfg.hs_test :]
    held_unsafe = round(len(unsafe_rest) * cfg.judge_test)
    held_safe = round(len(safe_only) * cfg.judge_test)
    judge_test = unsafe_rest[:held_unsafe] + safe_only[:held_safe]
    train = unsafe_rest[held_unsafe:] + safe_only[held_safe:]
    rows_of = lambda prompts: [r for p in sorted(prompts) for r in by_prompt[p]]  # noqa: E731
    return Split(train=rows_of(train), hs_test=rows_of(hs_test), judge_test=rows_of(judge_test),
                 contrast=rows_of(contrast),
                 contrast_alignment_prompts={r.prompt for p in contrast[: round(len(contrast) * cfg.contrast_alignment)]
                                             for r in by_prompt[p]})


def load_split(cfg: SplitConfig) -> Split:
    """Read the configured sources and split them."""
    if not cfg.sources:
        raise ConfigError("data.split.sources", cfg.sources, "is empty: name the labeled BeaverTails rows to split")
    return split_rows(load_labeled(cfg.sources), cfg)
