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


SCORERS = {"sst2": label_match, "agnews": label_match, "gsm8k": number_match, "alpaca": label_match}


def score(example: TaskExample, prediction: str) -> bool:
    """Is `prediction` a correct answer to `example`?"""
    return SCORERS[example.task](prediction, example.answer)
