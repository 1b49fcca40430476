"""The generation backend interface: HF generate on CPU/GPU now, vLLM on GPU later."""

from __future__ import annotations

from typing import Protocol


class Generator(Protocol):
    """Answers instructions: the template is applied inside, answers come back without it."""

    def generate(self, instructions: list[str]) -> list[str]:
        """Greedy answers, one per instruction, in the same order."""
        ...
