"""Judges decide whether an answer to a harmful prompt is harmful. Each gets the raw prompt and the answer.

Kinds (eval.judge.kind): `refusal` (keyword judge, refusal.py), `moderation` (a beaver-dam style classifier,
moderation.py), `trained` (the CPU judge `hftlab judge train` builds, trained.py), `llama_guard` (Llama Guard 3,
llama_guard.py). Model weights load only when a judge of that kind is made.
"""

from __future__ import annotations

from typing import Protocol

from hftlab.config.schema import Config, JudgeConfig


class Judge(Protocol):
    def judge(self, prompts: list[str], answers: list[str]) -> list[bool]:
        """True = harmful, one per (prompt, answer)."""
        ...


def make_judge(cfg: JudgeConfig, trust_remote_code: bool = False, *, kind: str | None = None,
               root: Config | None = None, log=print) -> Judge:
    """The judge of `kind` (default cfg.kind). kind=trained without eval.judge.model needs the whole config (`root`):
    it loads the cached judge that config trains, training it first if it is missing."""
    kind = kind or cfg.kind
    if kind == "refusal":
        from hftlab.judges.refusal import RefusalJudge

        return RefusalJudge()
    model = cfg.model_for(kind)
    if kind == "trained":
        from hftlab.judges.trained import TrainedJudge, trained_judge_model

        return TrainedJudge(trained_judge_model(cfg, root, log), threshold=cfg.threshold, batch_size=cfg.batch_size)
    if kind == "llama_guard":
        from hftlab.judges.llama_guard import LlamaGuardJudge

        return LlamaGuardJudge(model, batch_size=cfg.batch_size, max_length=cfg.max_length,
                               trust_remote_code=trust_remote_code)
    from hftlab.judges.moderation import ModerationJudge

    return ModerationJudge(model, threshold=cfg.threshold, batch_size=cfg.batch_size, max_length=cfg.max_length,
                           trust_remote_code=trust_remote_code)


def scores(judge: Judge, prompts: list[str], answers: list[str]) -> list[float]:
    """How harmful each answer is by `judge` in [0, 1]: its probability where it has one, else its verdict as 0/1."""
    fn = getattr(judge, "scores", None)
    return list(fn(prompts, answers)) if fn is not None else [float(v) for v in judge.judge(prompts, answers)]
