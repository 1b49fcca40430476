"""Batched greedy HF `generate` with left padding and a KV cache."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from hftlab.data.template import prompt_text


class HFGenerator:
    """Wraps a loaded causal LM; sorts prompts by length so batches pad little."""

    def __init__(self, model, tokenizer, *, template: str, max_new_tokens: int, batch_size: int,
                 progress: bool = True) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.template, self.max_new_tokens, self.batch_size = template, max_new_tokens, batch_size
        self.progress = progress

    @torch.no_grad()
    def generate(self, instructions: list[str]) -> list[str]:
        texts = [prompt_text(i, self.template) for i in instructions]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        answers: list[str] = [""] * len(texts)
        self.tokenizer.padding_side = "left"
        self.model.eval()
        starts = range(0, len(order), self.batch_size)
        for start in tqdm(starts, desc="generate", disable=not self.progress, leave=False):
            idx = order[start : start + self.batch_size]
            enc = self.tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True)
            enc = {k: v.to(self.model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            out = self.model.generate(
                **enc, do_sample=False, max_new_tokens=self.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
            )
            new_tokens = out[:, enc["input_ids"].shape[1] :]
            for i, text in zip(idx, self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True), strict=True):
                answers[i] = text.strip()
        return answers
