"""Tokenise (prompt, response) pairs with the template; the loss sees only the response tokens."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch

from hftlab.data.template import full_text, prompt_text

Pair = tuple[str, str]  # (instruction, response)


def encode(tokenizer, pairs: Sequence[Pair], template: str, max_length: int) -> list[tuple[list[int], int]]:
    """Each pair -> (token ids ending in EOS, number of prompt tokens to mask), Alpaca-style."""
    prompts = tokenizer([prompt_text(p, template) for p, _ in pairs], add_special_tokens=True)["input_ids"]
    fulls = tokenizer([full_text(p, r, template) for p, r in pairs], add_special_tokens=True)["input_ids"]
    out = []
    for prompt_ids, ids in zip(prompts, fulls, strict=True):
        ids = (ids + [tokenizer.eos_token_id])[:max_length]
        out.append((ids, min(len(prompt_ids), len(ids))))
    return out


def collate(encoded: Sequence[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; labels are -100 on the prompt and the padding."""
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        labels[row, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def batches(encoded: Sequence[tuple[list[int], int]], batch_size: int, pad_id: int, seed: int) -> Iterator[dict]:
    """One epoch of shuffled batches (the order is a function of `seed` only)."""
    order = list(range(len(encoded)))
    random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield collate([encoded[i] for i in order[start : start + batch_size]], pad_id)
