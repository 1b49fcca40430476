"""The one prompt template, used identically for training, generation and (its prompt part) judging.

The judge never sees the template: it gets the user's raw prompt and the answer (the public
reference code fed the judge the instruction template, which a classifier never saw in training).
"""

from __future__ import annotations

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


def prompt_text(instruction: str, template: str) -> str:
    """What the model is given at generation time."""
    head, _ = TEMPLATES[template]
    return head.format(instruction=instruction)


def full_text(instruction: str, response: str, template: str) -> str:
    """What the model is trained on: the prompt text followed by the response."""
    head, sep = TEMPLATES[template]
    return head.format(instruction=instruction) + sep + response
