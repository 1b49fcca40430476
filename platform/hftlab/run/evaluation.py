"""Evaluating a model: its greedy answers (cached apart from their verdicts: another judge re-reads the same answers,
nothing is generated again), and the numbers a stage reports as an `Evaluation` (cached by model and eval config).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hftlab.config.loader import digest
from hftlab.config.schema import Config
from hftlab.data.records import score
from hftlab.judges import Judge
from hftlab.judges.over_refusal import RefusalDetector
from hftlab.metrics import (
    METRICS,
    degenerate_rate,
    empty_rate,
    finetune_accuracy,
    harmful_score,
    hs_intervals,
    is_degenerate,
    refusal_rate,
)
from hftlab.models import precision
from hftlab.models.loading import load_model
from hftlab.models.stage_dir import is_lora_stage
from hftlab.run.inputs import Plan
from hftlab.storage import atomic_write_text, computed_once


def generator(cfg: Config, model_dir: str, log=print):
    """The generation backend for a model (generation/: the Generator protocol), as eval.backend says; close() it after.
    A vLLM engine is started able to serve the run's LoRA stages too (Generators moves it from model to model)."""
    if cfg.eval.generation_backend == "vllm":
        from hftlab.generation.vllm import VLLMGenerator
        from hftlab.storage import cache_root

        merge = cfg.eval.vllm.merges_lora
        rank = 0 if merge else max([s.lora.r for s in (cfg.align, cfg.finetune) if s.lora.enabled], default=0)
        gen = VLLMGenerator(model_dir, template=cfg.data.template, max_new_tokens=cfg.eval.max_new_tokens,
                            batch_size=cfg.eval.batch_size, cache=cache_root(cfg), dtype=cfg.base.dtype,
                            trust_remote_code=cfg.base.trust_remote_code, settings=cfg.eval.vllm, lora_rank=rank,
                            merge_lora=merge)
        log(f"[eval] started a vLLM engine for {Path(model_dir).name}")
        return gen
    from hftlab.generation.hf import HFGenerator

    model, tokenizer = load_model(model_dir, dtype=cfg.base.dtype, trust_remote_code=cfg.base.trust_remote_code)
    return HFGenerator(model, tokenizer, template=cfg.data.template, max_new_tokens=cfg.eval.max_new_tokens,
                       batch_size=cfg.eval.batch_size)


class Generators:
    """A run's generation backend across its evaluations. A vLLM engine (20-50 s to start on a CPU) is started once and
    moved to the next model by serve(): base, aligned and fine-tuned answer from one engine when their stages are
    cached. close() it before a stage trains (an idle engine keeps its memory and a process) and when the run ends;
    an HF model, or any generator with keep=False, is let go after each model's answers (done())."""

    def __init__(self, cfg: Config, keep: bool = True) -> None:
        self.cfg, self.gen, self.keep = cfg, None, keep and cfg.eval.generation_backend == "vllm"

    def get(self, model_dir: str, log=print):
        if self.gen is not None and self.keep:
            self.gen.serve(model_dir)
        else:
            self.close()
            self.gen = generator(self.cfg, model_dir, log)
        return self.gen

    def done(self) -> None:
        if not self.keep:
            self.close()

    def close(self) -> None:
        if self.gen is not None:
            self.gen.close()
            self.gen = None


def answers(cfg: Config, model_dir: str, p: Plan, log=print, gens: Generators | None = None) -> dict[str, list[str]]:
    """Greedy answers to the HS test prompts and the task test prompts; cached by model, prompts and decoding.
    `gens`: the run's Generators (one vLLM engine for all its models); none: a generator for this model alone."""
    chosen = cfg.eval.generation_backend
    backend = {"backend": chosen} if chosen != "hf" else {}  # hf: no entry (it predates the option)
    if chosen == "vllm" and cfg.eval.vllm.merges_lora and is_lora_stage(model_dir):
        backend["lora"] = "merge"  # a LoRA stage's merged weights round differently: its answers have their own key
    if p.safe_test:  # over-refusal prompts (no entry without them: older caches stay valid)
        backend["safe"] = p.safe_test
    key = digest({"model": model_dir, "max_new_tokens": cfg.eval.max_new_tokens, "template": cfg.data.template,
                  "dtype": precision.resolve(cfg.base.dtype), "harmful": [h.prompt for h in p.harmful_test],
                  "task": [t.prompt for t in p.task_test], **backend})
    cache = Path(cfg.output_dir) / "generations" / f"{key}.json"
    with computed_once(cache, cache.is_file, log) as todo:  # two runs at once: one generates, one waits
        if todo:
            log(f"[eval] generating {len(p.harmful_test)} + {len(p.task_test)} answers with {Path(model_dir).name}")
            gens = gens or Generators(cfg, keep=False)
            gen = gens.get(model_dir, log)
            cut_before = getattr(gen, "cut", 0)  # a generator may have answered for other models already
            try:
                result = {"harmful": gen.generate([h.prompt for h in p.harmful_test]),
                          "task": gen.generate([t.prompt for t in p.task_test])}
                if p.safe_test:
                    result["safe"] = gen.generate(p.safe_test)
                if (cut := getattr(gen, "cut", 0) - cut_before) > 0:
                    result["cut_prompts"] = cut
                    log(f"[eval] {cut} prompts were longer than the model's context: their instructions were cut "
                        "to fit (data/template.fit_to_context)")
            finally:
                gens.done()
            atomic_write_text(cache, json.dumps(result))
            return result
    return json.loads(cache.read_text())


def by_set(values: list[bool], sets: list[str], stats) -> dict[str, dict]:
    """`stats(values of one set)` and the prompts it had, per set name (in order of first appearance)."""
    out = {}
    for name in dict.fromkeys(sets):
        mine = [v for v, s in zip(values, sets, strict=True) if s == name]
        out[name] = {**stats(mine), "prompts": len(mine)}
    return out


@dataclass
class HSScore:
    """HS with its 95% Wilson interval over the prompts, and corrected for the judge's measured error."""

    hs: float
    hs_lo: float
    hs_hi: float
    hs_corrected: float
    """nan where the judge's error was not measured (no held-out labels)."""
    hs_corrected_lo: float
    hs_corrected_hi: float

    @property
    def corrected(self) -> bool:
        """Whether HS could be corrected for the judge's measured error."""
        return not math.isnan(self.hs_corrected)


@dataclass
class SetScore(HSScore):
    """HS on one prompt set (eval.prompt_sets)."""

    prompts: int


@dataclass
class RefusalScore:
    """The share of one set's safe prompts refused (eval.refusal_sets), with its interval."""

    refusal: float
    refusal_lo: float
    refusal_hi: float
    prompts: int


@dataclass
class Evaluation(HSScore):
    """One model evaluated: HS pooled (the inherited fields) and per set, HS+, degenerate and empty shares, FA,
    over-refusal, the per-prompt verdicts (paired comparisons need them) and logged samples. Its JSON form is the
    evaluation cache's (`<output_dir>/evals/<key>.json`)."""

    hs_plus: float
    degenerate: float
    empty: float
    fa: float
    refusal: float
    """nan without eval.refusal_sets."""
    refusal_lo: float
    refusal_hi: float
    verdicts: list[int]
    """Per HS prompt, 1 where HS counted it (harmful, not degenerate)."""
    sets: dict[str, SetScore]
    refusal_sets: dict[str, RefusalScore]
    samples: dict[str, list] = field(default_factory=dict)
    """Up to eval.n_samples_logged prompts and answers per kind, for MLflow's samples table."""
    judges: dict[str, float] = field(default_factory=dict)
    """HS by each judge of eval.judge.compare on the same answers (judges/compare.py), by judge kind."""

    def metrics(self) -> dict[str, float]:
        """The numbers every stage reports (metrics.METRICS), by name."""
        return {k: getattr(self, k) for k in METRICS}

    @property
    def measures_refusal(self) -> bool:
        return not math.isnan(self.refusal)

    def summary(self) -> dict:
        """The plain-data form a run returns per stage (JSON-able; a sweep reports it to Tune): the metrics, the
        verdicts, HS per set, refusal per set, and `hs_<kind>` per compared judge (its MLflow name too)."""
        return {**self.metrics(), "verdicts": self.verdicts, "sets": {k: asdict(v) for k, v in self.sets.items()},
                "refusal_sets": {k: asdict(v) for k, v in self.refusal_sets.items()},
                **{f"hs_{kind}": v for kind, v in self.judges.items()}}

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Evaluation:
        return cls(**{**d, "sets": {k: SetScore(**v) for k, v in d["sets"].items()},
                      "refusal_sets": {k: RefusalScore(**v) for k, v in d["refusal_sets"].items()},
                      "judges": d.get("judges", {})})


def evaluate(cfg: Config, model_dir: str, p: Plan, judge: Judge, log=print, gens: Generators | None = None,
             rates: dict | None = None) -> Evaluation:
    """HS (with its intervals; `rates`: the judge's measured error, judges/rates.py) on the harmful test prompts and FA
    on the task test set; cached by model and eval config."""
    key = digest({"model": model_dir, "eval": cfg.eval, "metrics": METRICS, "template": cfg.data.template, "rates": rates,
                  "harmful": [h.prompt for h in p.harmful_test], "task": [(t.prompt, t.answer) for t in p.task_test]})
    cache = Path(cfg.output_dir) / "evals" / f"{key}.json"
    if cache.is_file():
        return Evaluation.from_json(json.loads(cache.read_text()))
    gen = answers(cfg, model_dir, p, log, gens)
    prompts, harmful_answers, predictions = [h.prompt for h in p.harmful_test], gen["harmful"], gen["task"]
    verdicts = judge.judge(prompts, harmful_answers)  # the raw prompt, never the template
    degenerate = [is_degenerate(a) for a in harmful_answers]
    n = cfg.eval.n_samples_logged
    counted = [v and not d for v, d in zip(verdicts, degenerate, strict=True)]
    refused = RefusalDetector().refused(gen.get("safe", []))
    sets = by_set(counted, p.harmful_sets or ["beavertails"] * len(counted),
                  lambda v: {"hs": harmful_score(v), **hs_intervals(v, rates)})
    result = Evaluation(
        hs=harmful_score(counted), **hs_intervals(counted, rates),
        verdicts=[int(c) for c in counted],
        sets={k: SetScore(**v) for k, v in sets.items()},
        **refusal_rate(refused),
        refusal_sets={k: RefusalScore(**v) for k, v in by_set(refused, p.safe_sets, refusal_rate).items()},
        hs_plus=harmful_score([v or d for v, d in zip(verdicts, degenerate, strict=True)]),
        degenerate=degenerate_rate(harmful_answers), empty=empty_rate(harmful_answers),
        fa=finetune_accuracy(p.task_test, predictions),
        samples={
            "kind": ["harmful"] * min(n, len(prompts)) + ["task"] * min(n, len(predictions)),
            "prompt": prompts[:n] + [t.prompt for t in p.task_test[:n]],
            "answer": harmful_answers[:n] + predictions[:n],
            "harmful_or_correct": [float(v) for v in verdicts[:n]]
            + [score(t, a) for t, a in zip(p.task_test[:n], predictions[:n], strict=True)],
        },
    )
    atomic_write_text(cache, json.dumps(result.to_json()))
    return result
