"""The judge's corpus: human-labeled answers of many sources, split by normalized prompt across all of them at once.

Why one split for all sources: the same request recurs across releases (PKU-SafeRLHF shares 644 prompts with the
BeaverTails rows), and a judge that saw a prompt's answers in one source and is scored on its answers in another
measures memory. So every row is keyed by its normalized prompt (`records.prompt_key`: case, punctuation and spacing
dropped), and a key lands on one side for every source:

- banned from training, never trained on: the prompts of the BeaverTails split's held-out pools (HS test, judge test,
  contrast: data/splits.py), of every `eval_whole` source (GPTFuzz's eval split: 20 questions no train row asks) and
  of every HS prompt set (`prompt_files`; a labeled prompt that starts with or contains one, e.g. a request with an
  adversarial suffix, counts as that prompt);
- kept for training: the BeaverTails split's train pool (so its alignment and poison pools stay the judge's train side);
- the rest: held out with probability `held_out` by a seeded hash of the key (the same key, the same side, in every
  source), else trained on.

Held-out slices are reported per source; banned rows of a labeled source (its answers to an HS prompt) are scored in
its slice too, but never trained on. No model is touched here: this is data only.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

from hftlab.data.records import prompt_key
from hftlab.data.sources import read_rows
from hftlab.data.splits import LabeledRow, Split, load_labeled


def source_name(path: str) -> str:
    """A slice's name: the file's stem (gptfuzz_train, do_not_answer, ...)."""
    return Path(path).stem


@dataclass
class Corpus:
    """Judge-train rows, and the held-out rows per slice (no normalized prompt of a slice is in `train`)."""

    train: list[LabeledRow] = field(default_factory=list)
    train_sources: list[str] = field(default_factory=list)
    """The source of each train row (for per-source caps and the summary)."""
    slices: dict[str, list[LabeledRow]] = field(default_factory=dict)

    def summary(self) -> dict[str, int]:
        out = {"train_rows": len(self.train), "train_unsafe": sum(not r.is_safe for r in self.train)}
        out.update({f"{name}_rows": len(rows) for name, rows in self.slices.items()})
        return out


class PromptIndex:
    """Normalized prompts, matched exactly or inside a longer prompt (>= 4 words: found by their first 4 words)."""

    def __init__(self, prompts: set[str]) -> None:
        self.exact = set(prompts)
        self.by_head: dict[tuple[str, ...], list[str]] = {}
        for p in self.exact:
            words = p.split()
            if len(words) >= 4:
                self.by_head.setdefault(tuple(words[:4]), []).append(p)

    def __contains__(self, key: str) -> bool:
        if key in self.exact:
            return True
        words = key.split()
        return any(p in key for i in range(len(words) - 3) for p in self.by_head.get(tuple(words[i : i + 4]), ()))


def prompt_keys(files: list[str], field_name: str) -> set[str]:
    """The normalized prompts of prompt-set files (rows with a `prompt`)."""
    keys = set()
    for f in files:
        for row in read_rows(f, field_name):
            if isinstance(row, dict) and row.get("prompt"):
                keys.add(prompt_key(str(row["prompt"])))
    return keys


def held(key: str, share: float, seed: int) -> bool:
    """A key's side, the same in every source and every run: a seeded hash below `share`."""
    h = int(hashlib.sha1(f"{seed}\x00{key}".encode()).hexdigest()[:15], 16) / float(1 << 60)
    return h < share


def build_corpus(split: Split, labeled: list[str], eval_whole: list[str], prompt_files: list[str], *,
                 held_out: float, seed: int, max_rows_per_source: int | None = None,
                 field_name: str = "eval.judge.train.corpus") -> Corpus:
    """Cut the split's BeaverTails rows and the `labeled` files into judge-train rows and held-out slices (see the
    module docstring); each `eval_whole` file is a slice of its own, never trained on."""
    bt_held = {prompt_key(r.prompt) for pool in (split.hs_test, split.judge_test, split.contrast) for r in pool}
    bt_train = {prompt_key(r.prompt) for r in split.train}
    whole = {source_name(f): load_labeled([f], "eval.judge.train.eval_whole") for f in eval_whole}
    banned = PromptIndex(bt_held | {prompt_key(r.prompt) for rows in whole.values() for r in rows}
                         | prompt_keys(prompt_files, "eval.judge.train.exclude_prompts"))
    corpus = Corpus()
    bt_train_rows = [r for r in split.train if prompt_key(r.prompt) not in banned]
    corpus.train += bt_train_rows
    corpus.train_sources += ["beavertails"] * len(bt_train_rows)
    corpus.slices["beavertails:judge_test"] = list(split.judge_test)
    corpus.slices["beavertails:contrast"] = list(split.contrast)
    seen = {r.id for r in split.train + split.judge_test + split.contrast + split.hs_test}
    for f in labeled:
        name = source_name(f)
        train, out = [], []
        for r in load_labeled([f], field_name):
            if r.id in seen:
                continue
            seen.add(r.id)
            key = prompt_key(r.prompt)
            if key in banned or (key not in bt_train and held(key, held_out, seed)):
                out.append(r)
            else:
                train.append(r)
        if max_rows_per_source is not None and len(train) > max_rows_per_source:
            train = _capped(train, max_rows_per_source, seed)
        corpus.train += train
        corpus.train_sources += [name] * len(train)
        corpus.slices[f"{name}:held_out"] = out
    corpus.slices.update(whole)
    return corpus


def _capped(rows: list[LabeledRow], n: int, seed: int) -> list[LabeledRow]:
    """`n` of `rows`, every unsafe row first (they are the scarce class), then safe ones at random (seeded)."""
    unsafe = [r for r in rows if not r.is_safe]
    safe = [r for r in rows if r.is_safe]
    random.Random(seed).shuffle(safe)
    keep = {r.id for r in (unsafe + safe)[:n]}
    return [r for r in rows if r.id in keep]
