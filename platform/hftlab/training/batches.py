"""Batches of encoded pairs (data/template.encode): padded, the loss on the response tokens only, in a seeded order."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch

Pair = tuple[str, str]  # (instruction, response)


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


MEGABATCH = 50  # bucketed: rows sorted by length within windows of 50 batches (transformers' get_length_grouped_indices)


def epoch_order(encoded: Sequence[tuple[list[int], int]], batch_size: int, seed: int, epoch: int,
                bucketed: bool = False) -> list[list[int]]:
    """The epoch's batches as lists of row indices: a shuffle of the rows cut into batches, or, `bucketed`, the same
    shuffle cut into windows of MEGABATCH batches, each window sorted by length (longest first) and cut into batches,
    and the batches shuffled again. A bucketed batch pads to rows of nearly its own length, not to the longest row of
    a random draw: on real data (BeaverTails, 30-256 tokens) that is a third to half of a step's tokens. It is the
    sampler HF Trainer's `group_by_length` uses (transformers trainer_pt_utils.py get_length_grouped_indices), with the
    longest window's batch not moved first, since the memory it would probe is not ours to size."""
    rng = random.Random(seed * 1000 + epoch)
    order = list(range(len(encoded)))
    rng.shuffle(order)
    if not bucketed:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    window = MEGABATCH * batch_size
    out = []
    for w in range(0, len(order), window):
        rows = sorted(order[w : w + window], key=lambda i: -len(encoded[i][0]))
        out += [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    rng.shuffle(out)
    return out


def batches(encoded: Sequence[tuple[list[int], int]], batch_size: int, pad_id: int, seed: int, epoch: int = 0,
            rank: int = 0, world: int = 1, bucketed: bool = False) -> Iterator[dict]:
    """One epoch of shuffled global batches (the order depends on seed and epoch only), this rank's slice of each.

    Rank r takes rows r, r + W, ... of every global batch. `norm` = the global batch's response tokens / W,
    so a loss of token sum / norm makes DDP's gradient average equal the one-process mean-token gradient;
    `rows` = this slice's rows of the global batch (0 for the zero-weight dummy slice of a too short batch).
    1 process, and W Ray Train workers, see the same batches and follow the same trajectory.
    `bucketed`: rows of like length batched together (epoch_order).
    """
    for index in epoch_order(encoded, batch_size, seed, epoch, bucketed):
        rows = [encoded[i] for i in index]
        tokens = sum(len(ids) - n_prompt for ids, n_prompt in rows)  # response tokens = labels after the shift
        mine = rows[rank::world]
        batch = collate(mine or rows[:1], pad_id)
        if not mine:  # fewer rows than ranks: a zero-weight slice, so every rank still steps together
            batch["labels"][:] = -100
        batch["norm"] = torch.tensor(max(tokens, 1) / world, dtype=torch.float32)
        batch["rows"] = torch.tensor(len(mine))  # 0 for a dummy slice: steps that gather rows over ranks skip it
        yield batch


def group_stream(encoded: list, batch_size: int, pad_id: int, seed: int, rank: int = 0, world: int = 1,
                 bucketed: bool = False) -> Iterator[dict]:
    """Endless batches of one group: epoch after epoch of `batches()` (this rank's slices)."""
    epoch = 0
    while True:
        yield from batches(encoded, batch_size, pad_id, seed, epoch, rank, world, bucketed)
        epoch += 1
