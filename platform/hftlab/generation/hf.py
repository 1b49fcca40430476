"""Batched greedy decoding for any HF causal LM: left padding, a KV cache, finished rows dropped.

HF `generate` keeps every row of a batch until the longest answer ends. Here a row leaves the
batch (and the KV cache) at its end-of-sequence token, so a batch costs the tokens its answers
really have. Faster than `generate` (`jobs/bench/groups.py` prints the ratio), with the same greedy
answers (tests/test_models.py checks them against `model.generate`).
"""

from __future__ import annotations

import inspect

import torch
from tqdm.auto import tqdm

from hftlab.data.template import add_special_tokens, fit_to_context, prompt_text


class HFGenerator:
    """Wraps a loaded causal LM; sorts prompts by length so batches pad little."""

    def __init__(self, model, tokenizer, *, template: str, max_new_tokens: int, batch_size: int,
                 progress: bool = True, system: str | None = None) -> None:
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.template, self.max_new_tokens, self.batch_size = template, max_new_tokens, batch_size
        self.progress = progress
        self.last_logit_only = "logits_to_keep" in inspect.signature(model.forward).parameters
        context = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 2048
        self.budget = max(context - max_new_tokens, 1)  # prompt tokens that leave room for the answer
        self.cut = 0  # prompts cut to fit the model's context so far (data/template.fit_to_context)

    def generate(self, instructions: list[str]) -> list[str]:
        instructions, cut = fit_to_context(list(instructions), self.template, self.tokenizer, self.budget, self.system)
        self.cut += cut
        texts = [prompt_text(i, self.template, self.tokenizer, self.system) for i in instructions]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        answers: list[str] = [""] * len(texts)
        self.tokenizer.padding_side = "left"
        self.model.eval()
        starts = range(0, len(order), self.batch_size)
        for start in tqdm(starts, desc="generate", disable=not self.progress, leave=False):
            idx = order[start : start + self.batch_size]
            for i, text in zip(idx, self.greedy([texts[i] for i in idx]), strict=True):
                answers[i] = text
        return answers

    def close(self) -> None:
        """Nothing to stop: the model is the caller's (the protocol's close() frees a vLLM engine)."""

    @torch.inference_mode()
    def greedy(self, texts: list[str]) -> list[str]:
        """One batch: prefill, then one token per step for the rows that have not ended yet."""
        steps = self.max_new_tokens
        if steps <= 0:
            return [""] * len(texts)
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens(self.template))
        ids, mask = enc["input_ids"].to(self.model.device), enc["attention_mask"].to(self.model.device)
        n, width = ids.shape
        full_mask = torch.cat([mask, mask.new_ones(n, steps)], dim=1)  # sliced per step, never re-grown
        extra = {"logits_to_keep": 1} if self.last_logit_only else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                         use_cache=True, **extra)
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1)
        position = mask.sum(-1, keepdim=True) - 1
        rows = torch.arange(n, device=ids.device)
        answers = torch.full((n, steps), self.tokenizer.pad_token_id, dtype=torch.long, device=ids.device)
        for step in range(steps):
            answers[rows, step] = token
            alive = token != self.tokenizer.eos_token_id
            n_alive = int(alive.sum())
            if step == steps - 1 or n_alive == 0:
                break
            if n_alive < len(rows):  # drop the ended rows, from the cache too
                keep = alive.nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                full_mask, token, rows, position = full_mask[keep], token[keep], rows[keep], position[keep]
            position = position + 1
            out = self.model(input_ids=token[:, None], attention_mask=full_mask[:, : width + step + 1],
                             position_ids=position, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1].argmax(-1)
        return [t.strip() for t in self.tokenizer.batch_decode(answers, skip_special_tokens=True)]
