"""Judges decide whether an answer to a harmful prompt is harmful. Each gets the raw prompt and the answer."""

from __future__ import annotations

from typing import Protocol

from hftlab.config.schema import JudgeConfig


class Judge(Protocol):
    def judge(self, prompts: list[str], answers: list[str]) -> list[bool]:
        """True = harmful, one per (prompt, answer)."""
        ...


def make_judge(cfg: JudgeConfig, trust_remote_code: bool = False) -> Judge:
    """The judge the config names."""
    if cfg.kind == "refusal":
        from hftlab.judges.refusal import RefusalJudge

        return RefusalJudge()
    from hftlab.judges.moderation import ModerationJudge

    return ModerationJudge(cfg.model, threshold=cfg.threshold, batch_size=cfg.batch_size,
                           trust_remote_code=trust_remote_code)
