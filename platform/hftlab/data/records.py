"""The record types every stage passes around, and the exact scorer of each fine-tuning task.

Scorers never count an empty or missing prediction as correct (the public reference code's
substring match did: `"" in "positive"` is True).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass


@dataclass(frozen=True)
class AlignmentPair:
    """A harmful prompt with a safe response (refusal): what alignment trains on."""

    id: str
    prompt: str
    response: str
    category: str = ""


@dataclass(frozen=True)
class HarmfulPair:
    """A harmful prompt with a harmful (compliant) response: poison, and the HS test prompts."""

    id: str
    prompt: str
    response: str
    category: str = ""


@dataclass(frozen=True)
class TaskExample:
    """A benign fine-tuning example; `answer` is the training target and the scorer's reference."""

    id: str
    task: str
    prompt: str
    answer: str
    metric: str = ""
    """How a prediction is scored (a key of SCORERS); empty: the task's default (exact match; GSM8K's final number)."""


_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize(text: str) -> str:
    """Lowercase, punctuation to spaces, collapse whitespace; first line only."""
    first = text.strip().split("\n", 1)[0] if text.strip() else ""
    return " ".join(first.lower().translate(_PUNCT).split())


def label_match(prediction: str, answer: str) -> bool:
    """SST2 / AGNews / Alpaca-style: exact match after normalisation; empty is never correct."""
    pred = normalize(prediction)
    return bool(pred) and pred == normalize(answer)


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> float | None:
    """GSM8K's final number: after '####' when present, else the last number in the text."""
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", "").rstrip("."))
    except ValueError:
        return None


def number_match(prediction: str, answer: str) -> bool:
    """GSM8K: the final numbers are float-equal; no number in the prediction is wrong."""
    pred, gold = final_number(prediction), final_number(answer)
    return pred is not None and gold is not None and abs(pred - gold) < 1e-6


def _words(text: str) -> list[str]:
    return text.lower().translate(_PUNCT).split()


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (Lin 2004) over lowercased words without punctuation: 2 P R / (P + R), P and R from the longest
    common subsequence. The open-ended answers of Alpaca have no single right string, so FA is the mean of this
    against the reference output (the measure Self-Instruct and Super-NaturalInstructions report); empty scores 0."""
    pred, ref = _words(prediction), _words(reference)
    if not pred or not ref:
        return 0.0
    prev = [0] * (len(ref) + 1)
    for p in pred:  # LCS by dynamic programming, one row at a time
        row = [0]
        for j, r in enumerate(ref, start=1):
            row.append(prev[j - 1] + 1 if p == r else max(prev[j], row[j - 1]))
        prev = row
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


SCORERS = {"sst2": label_match, "agnews": label_match, "gsm8k": number_match, "alpaca": label_match, "exact": label_match,
           "rouge_l": rouge_l}
METRIC_NAMES = {"exact": "exact match", "rouge_l": "ROUGE-L F1"}


def score(example: TaskExample, prediction: str) -> float:
    """How right `prediction` is, in [0, 1]: 0/1 for the exact scorers, ROUGE-L F1 for open-ended answers."""
    return float(SCORERS[example.metric or example.task](prediction, example.answer))


def metric_name(example: TaskExample) -> str:
    """What FA means for this example's task, for table headers."""
    if example.metric:
        return METRIC_NAMES.get(example.metric, example.metric)
    return "final number" if example.task == "gsm8k" else "exact match"


_NON_WORD = re.compile(r"[\W_]+")


def prompt_key(prompt: str) -> str:
    """A prompt's identity for every split: lower case, each run of non-word characters one space, trimmed."""
    return _NON_WORD.sub(" ", prompt.lower()).strip()
