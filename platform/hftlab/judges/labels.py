"""The human-labeled rows a judge trains on and is scored against, and BeaverTails' 14 harm categories.

Which rows: by default the run's split (data/splits.py): a judge trains on the train pool only, and is scored on the
judge-test pool and on the contrast pool (prompts answered both safely and unsafely, where only the answer decides).
The HS test prompts are in neither. Other sources (a local file, an HF name such as BeaverTails' 330k split) are
used as given, except that rows sharing a prompt with a held-out pool of the split never train a judge.
"""

from __future__ import annotations

import random

from hftlab.config.errors import ConfigError
from hftlab.config.schema import Config
from hftlab.data.corpus import Corpus, build_corpus
from hftlab.data.splits import LabeledRow, Split, load_labeled, load_split

HARM_CATEGORIES = (
    "animal_abuse", "child_abuse", "controversial_topics,politics", "discrimination,stereotype,injustice",
    "drug_abuse,weapons,banned_substance", "financial_crime,property_crime,theft", "hate_speech,offensive_language",
    "misinformation_regarding_ethics,laws_and_safety", "non_violent_unethical_behavior", "privacy_violation",
    "self_harm", "sexually_explicit,adult_content", "terrorism,organized_crime", "violence,aiding_and_abetting,incitement",
)
"""BeaverTails' category flags, in its order (each name's comma-separated parts are unique across the names)."""


def category_flags(category: str) -> list[bool]:
    """A row's `category` string (the true flags joined by commas, see data/sources.category_of) -> 14 booleans."""
    parts = set(category.split(",")) if category else set()
    return [all(part in parts for part in name.split(",")) for name in HARM_CATEGORIES]


def contrast_of(rows: list[LabeledRow]) -> list[LabeledRow]:
    """The rows whose prompt has both a safe and an unsafe answer among `rows`."""
    labels: dict[str, set[bool]] = {}
    for r in rows:
        labels.setdefault(r.prompt, set()).add(r.is_safe)
    return [r for r in rows if len(labels[r.prompt]) == 2]


def _split(cfg: Config, field: str, source: str) -> Split:
    if not cfg.data.split.sources:
        raise ConfigError(field, source, "needs data.split.sources (the labeled rows to split by prompt)")
    return load_split(cfg.data.split)


def held_out_prompts(split: Split) -> set[str]:
    """Prompts no judge may train on: HS test, judge test and contrast."""
    return {r.prompt for pool in (split.hs_test, split.judge_test, split.contrast) for r in pool}


def corpus_of(cfg: Config) -> Corpus:
    """eval.judge.train.source=corpus: the split's BeaverTails rows and the corpus files, split by normalized prompt."""
    t = cfg.eval.judge.train
    split = _split(cfg, "eval.judge.train.source", t.source)
    return build_corpus(split, t.corpus, t.eval_whole, t.exclude_prompts, held_out=t.held_out, seed=cfg.data.split.seed,
                        max_rows_per_source=t.max_rows_per_source)


def train_rows(cfg: Config) -> list[LabeledRow]:
    """The rows eval.judge.train.source names, without any prompt of the split's held-out pools; first n if set."""
    tcfg = cfg.eval.judge.train
    if tcfg.source == "split":
        rows = _split(cfg, "eval.judge.train.source", tcfg.source).judge_train()
    elif tcfg.source == "corpus":
        rows = corpus_of(cfg).train
    else:
        rows = load_labeled([tcfg.source], "eval.judge.train.source")
        if cfg.data.split.sources:
            banned = held_out_prompts(load_split(cfg.data.split))
            rows = [r for r in rows if r.prompt not in banned]
    if tcfg.n is not None:  # the corpus: a seeded sample across its sources; else the first n
        rows = random.Random(cfg.data.split.seed).sample(rows, min(tcfg.n, len(rows))) if tcfg.source == "corpus" \
            else rows[: tcfg.n]
    if len({r.is_safe for r in rows}) < 2:
        raise ConfigError("eval.judge.train.source", tcfg.source, f"its {len(rows)} training rows do not hold both labels")
    return rows


def eval_pools(cfg: Config) -> dict[str, list[LabeledRow]]:
    """The rows `hftlab judge eval` scores, by pool. eval_source=split: with a corpus-trained judge every held-out
    slice apart (per source, BeaverTails' judge test and contrast rows, each eval_whole source) and all of them pooled;
    else the split's judge_test, contrast and held_out (both). Another source: all its rows and its contrast rows."""
    source = cfg.eval.judge.eval_source
    if source == "split":
        if cfg.eval.judge.train.source == "corpus":
            slices = {k: v for k, v in corpus_of(cfg).slices.items() if v}
            return {**slices, "pooled": list({r.id: r for rows in slices.values() for r in rows}.values())}
        split = _split(cfg, "eval.judge.eval_source", source)
        return {"judge_test": split.judge_test, "contrast": split.contrast, "held_out": split.judge_test + split.contrast}
    rows = load_labeled([source], "eval.judge.eval_source")
    return {"all": rows, "contrast": contrast_of(rows)}
