"""Step-time overhead of the defenses vs plain SFT, measured side by side, one JSON line.

    python jobs/bench/overhead.py --config configs/quickstart.yaml [--steps 60] [threads=1 ...]

Trailing arguments are config overrides. On a shared CPU box pass threads=1: with more torch threads than free
cores, intra-op threads spin against each other and every step gets 10-40x slower, and noisier.

Same model (the config's base), same batches (the config's alignment pairs, batch size align.batch_size), same
engine; the methods' steps are interleaved round by round so that machine noise hits all of them alike. Booster
and RepNoise also read harmful batches of the same size, from the defenses' harmful pairs (`plan(cfg).defense_harmful`),
each contender its own stream over the same batches in the same order. SafeGrad (a fine-tuning-stage method, whose
plain counterpart is the same SFT step) at cadence 1 and 4, with finetune.safegrad's loss, mode and alignment
batch size; its ratios are of total time, since cadence 4 mixes 2- and 1-backward steps. With the KL loss its
reference log-probabilities are computed once over the fixed alignment set before the first step (the pipeline
does the same, finetune.safegrad.cache_reference); that one-time pass is reported apart (`safegrad_reference_s`,
and `safegrad_reference_vs_sft_step`: in SFT steps), and cadence 4 with a reference forward per probe
(`safegrad_k4_uncached`) is timed beside it.

Ratios are of median step times, except the stochastic VAA form's, which mixes 1- and 2-backward steps and is
compared by total time. VAA runs over a full linear 0 -> 1 curriculum of `--steps` steps, so its stochastic form
averages 1.5 backward passes. `<name>_mean_backward` is the mean `n_backward` the step reported (RepNoise: one
backward through two forwards, so ~2x SFT at 1 backward). `harmful_tokens_vs_align` (h) is how much bigger the
harmful batches are (padded tokens): Booster costs about 1 + 2h SFT steps, RepNoise about 1 + h.

A contender is a name and a `make(engine) -> step` (plus, for steps that draw their own batches, a `feed` that
turns the round's batch into what the step takes); add one to `contenders()` and it is timed with the others.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "platform"))

import torch  # noqa: E402

from hftlab.algorithms.booster import BoosterStep  # noqa: E402
from hftlab.algorithms.curriculum import make_schedule  # noqa: E402
from hftlab.algorithms.repnoise import RepNoiseStep  # noqa: E402
from hftlab.algorithms.safegrad import SafeGradStep  # noqa: E402
from hftlab.algorithms.sampler import GroupSampler  # noqa: E402
from hftlab.algorithms.sft import sft_step  # noqa: E402
from hftlab.algorithms.vaa import VAAStep  # noqa: E402
from hftlab.algorithms.vaccine import VaccineStep  # noqa: E402
from hftlab.config import load_config  # noqa: E402
from hftlab.data.template import encode  # noqa: E402
from hftlab.models.loading import load_model  # noqa: E402
from hftlab.run.pipeline import base_model, plan  # noqa: E402
from hftlab.training.batches import collate  # noqa: E402
from hftlab.training.builtin_methods import safegrad_reference  # noqa: E402
from hftlab.training.engine import LocalEngine  # noqa: E402

Batch = dict[str, torch.Tensor]


@dataclass
class Contender:
    """One timed method: how to build its step on a fresh engine, and what it is fed each round."""

    make: Callable[[LocalEngine], Callable]
    feed: Callable[[Batch], Any] = lambda batch: batch
    times: list[float] = field(default_factory=list)
    backward: list[float] = field(default_factory=list)
    setup_s: float = 0.0


def contenders(cfg, steps: int, harmful: list[Batch], safe: list[Batch], safe_rows: list, pad_id: int
               ) -> dict[str, Contender]:
    """The methods timed against "sft" (the first), each on its own copy of the base model.

    SafeGrad is a fine-tuning-stage method: its plain counterpart is the same SFT step (plain fine-tuning).
    """
    al, sg = cfg.align, cfg.finetune.safegrad

    def safegrad(cadence: int, cache: bool = True) -> Contender:
        def make(engine: LocalEngine) -> SafeGradStep:
            stage = replace(cfg.finetune, safegrad=replace(sg, cache_reference=cache))
            ref = safegrad_reference(stage, engine, None, safe_rows, pad_id) if sg.align_loss == "kl" else None
            return SafeGradStep(itertools.cycle(safe).__next__, align_loss=sg.align_loss, reference=ref, mode=sg.mode,
                                rho=sg.rho, cadence=cadence)

        return Contender(make)

    def vaa(objective: str) -> Contender:
        def make(_engine: LocalEngine) -> VAAStep:
            sampler = GroupSampler(2, eta_q=al.vaa.eta_q, q_min=al.vaa.q_min, q_max=al.vaa.q_max)
            return VAAStep(sampler, rho=al.vaa.rho or 0.4, total_steps=steps, schedule=make_schedule("linear", 1.0),
                           objective=objective, seed=cfg.seed, update_on_perturbed=al.vaa.update_on_perturbed)

        return Contender(make, feed=lambda batch: (lambda _group: batch))  # VAA asks for a batch of its group

    def stream() -> Callable[[], Batch]:  # every contender reads the same harmful batches in the same order
        return itertools.cycle(harmful).__next__

    suffix = {"attention": "Attention", "decoder": "DecoderLayer"}[al.vaccine.layers]
    return {
        "sft": Contender(lambda _e: sft_step),
        "vaa_stochastic": vaa("stochastic"),
        "vaa_weighted": vaa("weighted"),
        "vaccine": Contender(lambda _e: VaccineStep(rho=al.vaccine.rho, module_suffix=suffix)),
        "booster": Contender(lambda _e: BoosterStep(stream(), lam=al.booster.lam, alpha=al.booster.alpha)),
        "repnoise": Contender(lambda _e: RepNoiseStep(stream(), alpha=al.repnoise.alpha, beta=al.repnoise.beta,
                                                      mask=al.repnoise.mask, pad_id=pad_id, seed=cfg.seed)),
        "safegrad_k1": safegrad(1),
        "safegrad_k4": safegrad(4),
        "safegrad_k4_uncached": safegrad(4, cache=False),
    }


def main(out=sys.stdout) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.config, ["tracking.enabled=false", *args.overrides])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    p = plan(cfg)
    base = base_model(cfg, log=lambda *a: print(*a, file=sys.stderr))
    bs = cfg.align.batch_size
    tokenizer = load_model(base)[1]

    def batches_of(pairs: list[tuple[str, str]]) -> list[Batch]:
        enc = encode(tokenizer, pairs[: bs * 8], cfg.data.template, cfg.base.max_length)
        return [collate(enc[i : i + bs], tokenizer.pad_token_id) for i in range(0, len(enc), bs)]

    batches = batches_of(p.align_pairs)
    harmful = batches_of([(h.prompt, h.response) for h in p.defense_harmful])
    sg_bs = cfg.finetune.safegrad.batch_size
    enc = encode(tokenizer, [(a.prompt, a.response) for a in p.alignment[: cfg.finetune.safegrad.n_alignment]],
                 cfg.data.template, cfg.base.max_length)
    safe = [collate(enc[i : i + sg_bs], tokenizer.pad_token_id) for i in range(0, len(enc), sg_bs)]

    runners = {}
    for name, c in contenders(cfg, args.steps, harmful, safe, enc, tokenizer.pad_token_id).items():
        model, _ = load_model(base)
        engine = LocalEngine(model, cfg.align.lr)
        start = time.perf_counter()
        step = c.make(engine)
        c.setup_s = time.perf_counter() - start
        runners[name] = (model, engine, step, c)

    for i in range(args.steps):
        batch = batches[i % len(batches)]
        for model, engine, step, c in runners.values():
            model.train()
            start = time.perf_counter()
            stats = step(model, c.feed(batch), engine)
            c.times.append(time.perf_counter() - start)
            c.backward.append(stats.get("n_backward", 1))

    cs = {name: r[3] for name, r in runners.items()}
    median = {name: statistics.median(c.times) for name, c in cs.items()}
    row = {
        "bench": "overhead", "config": args.config, "steps": args.steps, "batch_size": bs,
        "threads": torch.get_num_threads(), "sft_step_ms": round(1000 * median["sft"], 2),
        # the stochastic form mixes 1- and 2-backward steps: its median says nothing, its total time does
        "vaa_stochastic_vs_sft": round(sum(cs["vaa_stochastic"].times) / sum(cs["sft"].times), 3),
        # h: harmful batches are longer than alignment ones; Booster's probes and RepNoise's second forward scale with it
        "harmful_tokens_vs_align": round(statistics.mean(b["input_ids"].numel() for b in harmful)
                                         / statistics.mean(b["input_ids"].numel() for b in batches), 3),
    }
    for name in cs:
        if name.startswith("safegrad"):  # cadence k mixes 2-backward and 1-backward steps: total time, like VAA's
            row[f"{name}_vs_sft"] = round(sum(cs[name].times) / sum(cs["sft"].times), 3)
        elif name not in ("sft", "vaa_stochastic"):
            row[f"{name}_vs_sft"] = round(median[name] / median["sft"], 3)
    for name in cs:
        if name != "sft":
            row[f"{name}_mean_backward"] = round(statistics.mean(cs[name].backward), 3)
    # the one-time reference pass over the alignment set (minus the frozen copy both variants make)
    row["safegrad_reference_s"] = round(max(cs["safegrad_k4"].setup_s - cs["safegrad_k4_uncached"].setup_s, 0.0), 3)
    row["safegrad_reference_vs_sft_step"] = round(row["safegrad_reference_s"] / median["sft"], 2)
    row["safegrad"] = {"align_loss": cfg.finetune.safegrad.align_loss, "mode": cfg.finetune.safegrad.mode,
                       "align_batch_size": sg_bs, "n_alignment": len(enc)}
    row["targets"] = {"safegrad_k1_vs_sft": "<= 2.0", "safegrad_k4_vs_sft": "<= 1.3 (reference cached)",
                      "vaa_stochastic_vs_sft": "<= 1.5 (paper: VAA 1.5x)", "vaccine_vs_sft": "< 2 (paper: 2x)",
                      "booster_vs_sft": "~1 + 2h (3 backward passes, two on the harmful batch)",
                      "repnoise_vs_sft": "~1 + h (one backward through both batches)"}
    print(json.dumps(row), file=out)


if __name__ == "__main__":
    import contextlib

    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # libraries print to stdout; only the JSON line goes there
        main(real_stdout)
