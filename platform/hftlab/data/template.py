"""The one prompt template, used identically for training, generation and (its prompt part) judging.

`compact` and `alpaca` are fixed strings for base models (the papers train base Llama-2 through Alpaca's);
`chat` is the tokenizer's own chat template (an instruct model is trained and queried in the format it was
tuned on). The judge never sees the template: it gets the user's raw prompt and the answer (the public
reference code fed the judge the instruction template, which a classifier never saw in training).

Training text = prompt text + response + EOS (appended by encode below), and the loss sees only what
follows the prompt text: for `chat` that is the assistant turn and its end-of-turn token (SmolLM2's EOS is
`<|im_end|>`), so the model learns to answer and to stop.
"""

from __future__ import annotations

from collections.abc import Sequence

TEMPLATES = {
    # Short, for the toy world's word-level tokenizer: every token costs CPU time.
    "compact": ("### Instruction : {instruction} ### Response :", " "),
    # The Alpaca template used by the Vaccine / Booster / VAA papers.
    "alpaca": (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n",
        "",
    ),
}
NAMES = (*TEMPLATES, "chat")


def prompt_text(instruction: str, template: str, tokenizer=None, system: str | None = None) -> str:
    """What the model is given at generation time (`chat` needs the tokenizer: its template is the model's).

    `system` replaces the chat template's default system turn (run/distill.py elicits refusals with it).
    """
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("data.template=chat needs a tokenizer with a chat template (a base model has none: use alpaca)")
        turns = [{"role": "system", "content": system}] if system else []
        return tokenizer.apply_chat_template(turns + [{"role": "user", "content": instruction}], tokenize=False,
                                             add_generation_prompt=True)
    if system:
        raise ValueError(f"a system prompt needs data.template=chat, not {template}")
    head, _ = TEMPLATES[template]
    return head.format(instruction=instruction)


def full_text(instruction: str, response: str, template: str, tokenizer=None) -> str:
    """What the model is trained on: the prompt text followed by the response (EOS is appended when tokenising)."""
    if template == "chat":
        return prompt_text(instruction, template, tokenizer) + response
    head, sep = TEMPLATES[template]
    return head.format(instruction=instruction) + sep + response


def add_special_tokens(template: str) -> bool:
    """Whether tokenising the text adds the tokenizer's special tokens: a chat template already holds them (BOS)."""
    return template != "chat"


def fit_to_context(instructions: list[str], template: str, tokenizer, budget: int, system: str | None = None
                   ) -> tuple[list[str], int]:
    """Each instruction cut so that its prompt (template included) takes at most `budget` tokens; returns the
    instructions and how many were cut. The instruction's tail goes: the template's head (system turn) and its
    assistant turn stay whole, so the model still answers where a plain cut of the token ids would not (from the
    right: no assistant turn to answer in; from the left: no chat start). A prompt whose UTF-8 bytes fit in the budget
    fits (a byte-level BPE token is at least one byte) and is not tokenised here."""
    out, cut = [], 0
    for text in instructions:
        prompt = prompt_text(text, template, tokenizer, system)
        if len(prompt.encode("utf-8")) <= budget:
            out.append(text)
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        over = len(tokenizer(prompt, add_special_tokens=add_special_tokens(template))["input_ids"]) - budget
        while over > 0:  # decode and re-encode need not round-trip exactly: cut again until it fits
            ids = ids[: max(len(ids) - over, 0)]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            prompt = prompt_text(text, template, tokenizer, system)
            over = len(tokenizer(prompt, add_special_tokens=add_special_tokens(template))["input_ids"]) - budget
            if not ids:
                break
        cut += 1
        out.append(text)
    return out, cut


def encode(tokenizer, pairs: Sequence[tuple[str, str]], template: str, max_length: int) -> list[tuple[list[int], int]]:
    """Each pair -> (token ids ending in EOS, number of prompt tokens to mask): the loss sees the response and EOS."""
    special = add_special_tokens(template)
    prompts = tokenizer([prompt_text(p, template, tokenizer) for p, _ in pairs], add_special_tokens=special)["input_ids"]
    fulls = tokenizer([full_text(p, r, template, tokenizer) for p, r in pairs], add_special_tokens=special)["input_ids"]
    out = []
    for prompt_ids, ids in zip(prompts, fulls, strict=True):
        ids = (ids + [tokenizer.eos_token_id])[:max_length]
        out.append((ids, min(len(prompt_ids), len(ids))))
    return out
