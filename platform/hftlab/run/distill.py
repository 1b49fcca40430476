"""Distilled refusals, a stage: alignment data for a real model that teaches it to refuse, made by the model itself.

Why: the papers align on BeaverTails' safe responses, but the local safe rows are mostly ordinary answers to
benign questions; training on them teaches style, not refusing (measured: docs/real-models.md). Safe answers to
harmful prompts are what alignment needs. Here the base model answers harmful prompts with a safety system prompt
in its system turn; the answers that refuse (a refusal phrase of the keyword judge, not degenerate) are kept, cut
back to their last full sentence, and join the alignment set *without* the system prompt: the aligned model
learns to refuse unprompted (context distillation). The prompts come out of the poison pool (run/inputs.py), so the
attack never trains on them, and never from the HS test prompts.

Cached by model, prompts and settings under `<output_dir>/refusals/`, written atomically; two runs that need the same
refusals at once: one generates them, the other waits (storage.computed_once). A stage, not data/: it runs a model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from hftlab.config.loader import digest
from hftlab.config.schema import Config
from hftlab.data.records import AlignmentPair, HarmfulPair
from hftlab.judges.refusal import RefusalJudge
from hftlab.metrics import is_degenerate
from hftlab.models import precision
from hftlab.storage import atomic_write_text, computed_once

VERSION = 1
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def last_sentence_cut(text: str) -> str:
    """The text up to its last sentence end (. ! ?), or all of it if it has none: no answer stops mid-sentence."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    return text[: ends[-1]].strip() if ends else text.strip()


def keep(answer: str) -> bool:
    """A refusal worth learning: not empty, not a repetition loop, and with a refusal phrase (the keyword judge's)."""
    refuses = not RefusalJudge().judge([""], [answer])[0]
    return bool(answer.strip()) and refuses and not is_degenerate(answer)


def distill_refusals(cfg: Config, base_dir: str, prompts: list[HarmfulPair], log=print) -> list[AlignmentPair]:
    """The kept refusals of the base model to `prompts` (see the module docstring), as alignment pairs."""
    rc = cfg.data.refusals
    if cfg.data.template != "chat":
        from hftlab.config.errors import ConfigError

        raise ConfigError("data.refusals.n", rc.n, "distilled refusals need data.template=chat (a system turn)")
    key = digest({"model": base_dir, "refusals": rc, "prompts": [h.prompt for h in prompts],
                  "dtype": precision.resolve(cfg.base.dtype), "v": VERSION})  # auto: what it resolved to here
    cache = Path(cfg.output_dir) / "refusals" / f"{key}.jsonl"
    with computed_once(cache, cache.is_file, log) as todo:
        if todo:
            from hftlab.generation.hf import HFGenerator
            from hftlab.models.loading import load_model

            log(f"[refusals] the base model answers {len(prompts)} harmful prompts under the safety system prompt")
            model, tokenizer = load_model(base_dir, dtype=cfg.base.dtype, trust_remote_code=cfg.base.trust_remote_code)
            gen = HFGenerator(model, tokenizer, template="chat", max_new_tokens=rc.max_new_tokens,
                              batch_size=cfg.eval.batch_size, system=rc.system_prompt)
            answers = [last_sentence_cut(a) for a in gen.generate([h.prompt for h in prompts])]
            rows = [{"id": f"refusal-{h.id}", "prompt": h.prompt, "response": a, "category": h.category, "kept": keep(a)}
                    for h, a in zip(prompts, answers, strict=True)]
            atomic_write_text(cache, "".join(json.dumps(r) + "\n" for r in rows))
    rows = [json.loads(line) for line in cache.read_text().splitlines() if line.strip()]
    kept = [AlignmentPair(r["id"], r["prompt"], r["response"], r["category"]) for r in rows if r["kept"]]
    log(f"[refusals] {len(kept)} of {len(rows)} answers refuse: they join the alignment set ({cache})")
    return kept
