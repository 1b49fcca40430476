"""Training throughput of a LoRA step on SmolLM2 over real BeaverTails lengths, one JSON line.

    python jobs/bench/training.py [--rows 64] [--rounds 2] [--batch-size 8] [--threads 2]

The real config's alignment step (LoRA r16 on all seven projections, max_length 256, AdamW with clipping) on the
first --rows safe BeaverTails pairs in the chat template, timed side by side, contenders interleaved batch by batch
so that machine noise hits them alike:
- `sft_{fp32,bf16}_{padded,bucketed}`: plain SFT in fp32, or fp32 weights under bf16 autocast (base.dtype=auto on a
  bf16 CPU); batches of a random shuffle padded to their longest row, or bucketed (training/batches.epoch_order);
- `sft_fp32_padded_ckpt`: fp32, padded, with gradient checkpointing: the real config before this bench
  (`best_vs_old`: the fastest SFT over it; `checkpointing_cost`: over `sft_fp32_padded`, the same batches);
- without bf16 hardware the bf16 contenders are left out and the fast ones are fp32;
- `vaa` (stochastic objective over a full 0 -> 1 curriculum, rho 0.4) and `safegrad_k4` (KL to the cached aligned
  reference, cadence 4), both in bf16 on the bucketed batches, against `sft_bf16_bucketed` on the same batches.
Rates are tokens per second, the tokens a row really has (padding is work, not throughput), and each rate is also a
share of this machine's matmul ceiling in its dtype (jobs/bench/ceiling.py): a LoRA step costs ~4 x parameters
FLOPs per token, 6 x with gradient checkpointing. Where a method's extra time goes: per step, milliseconds in the
probe gradients (engine.grad: VAA's perturbation direction, SafeGrad's alignment gradient), in the update's
backward, in the optimizer, and the rest (forwards, the projection, the perturbation).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "platform"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from ceiling import ceilings, flops_per_token  # noqa: E402

LORA = dict(r=16, alpha=32, dropout=0.1)  # configs/real/smollm2-beavertails.yaml


def timed(engine, clock: dict[str, float]):
    """Wrap the engine's grad / backward / step so that their time lands in `clock` (the engine's own methods)."""
    for name in ("grad", "backward", "step"):
        fn = getattr(engine, name)

        def wrapper(*a, _fn=fn, _name=name):
            start = time.perf_counter()
            try:
                return _fn(*a)
            finally:
                clock[_name] += time.perf_counter() - start

        setattr(engine, name, wrapper)
    return engine


@dataclass
class Contender:
    """A step on its own model copy, fed the padded or the bucketed batches, in fp32 or under bf16 autocast."""

    bucketed: bool
    autocast: str | None
    checkpointing: bool = False
    method: str = "sft"
    seconds: list[float] = field(default_factory=list)
    tokens: int = 0
    padded_tokens: int = 0
    backward: list[float] = field(default_factory=list)
    clock: dict[str, float] = field(default_factory=lambda: defaultdict(float))


def main(out=sys.stdout) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="epochs over the rows, each contender")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--data", default=os.environ.get("HFTLAB_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--cache", default=os.environ.get("HFTLAB_CACHE", str(Path.home() / ".cache" / "hftlab")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from hftlab.algorithms.curriculum import make_schedule
    from hftlab.algorithms.safegrad import SafeGradStep
    from hftlab.algorithms.sampler import GroupSampler
    from hftlab.algorithms.sft import sft_step
    from hftlab.algorithms.vaa import VAAStep
    from hftlab.config.schema import FinetuneConfig, LoraConfig, SafeGradConfig
    from hftlab.data.template import encode
    from hftlab.models import precision
    from hftlab.models.loading import add_lora, for_training, load_model
    from hftlab.models.sources import resolve
    from hftlab.training.batches import collate, epoch_order
    from hftlab.training.builtin_methods import safegrad_reference
    from hftlab.training.engine import LocalEngine, Recipe

    model_dir = resolve(args.model, Path(args.cache), log=lambda *a: print(*a, file=sys.stderr))
    data = Path(args.data) / "beavertails"
    rows = [json.loads(line) for line in (data / "30k_test_safe_filtered.jsonl").open()][: args.rows * 2]
    pairs = [(r["prompt"], r["response"]) for r in rows]
    tokenizer = load_model(model_dir)[1]
    enc = encode(tokenizer, pairs[: args.rows], "chat", args.max_length)
    safe_rows = encode(tokenizer, pairs[args.rows :], "chat", args.max_length)  # SafeGrad's alignment set
    pad = tokenizer.pad_token_id
    lora = LoraConfig(enabled=True, **LORA)
    sg_cfg = SafeGradConfig(cadence=4)
    safe = [collate([safe_rows[i] for i in b], pad)  # bucketed, as the pipeline's side stream under batching=bucketed
            for b in epoch_order(safe_rows, sg_cfg.batch_size, 7919, 0, bucketed=True)]
    bf16 = "bfloat16" if precision.has_bf16() else None
    steps = args.rounds * -(-args.rows // args.batch_size)

    # without bf16 hardware (bf16 emulated at ~1% of fp32's rate: the ceiling says so) the fast dtype is fp32 and the
    # bf16 contenders are left out; what the config's `auto` would run is the `fast` one either way
    fast = "bf16" if bf16 else "fp32"
    contenders = {"sft_fp32_padded_ckpt": Contender(False, None, checkpointing=True),  # the real config until now
                  "sft_fp32_padded": Contender(False, None), "sft_fp32_bucketed": Contender(True, None)}
    if bf16:
        contenders |= {"sft_bf16_padded": Contender(False, bf16), "sft_bf16_bucketed": Contender(True, bf16)}
    contenders |= {"vaa": Contender(True, bf16, method="vaa"), "safegrad_k4": Contender(True, bf16, method="safegrad")}
    runners = {}
    for name, c in contenders.items():
        torch.manual_seed(0)
        model = for_training(add_lora(load_model(model_dir)[0], lora), c.checkpointing)
        engine = timed(LocalEngine(model, Recipe(3e-4, 0.1, 1.0, "constant", 0.0, steps)), c.clock)
        if c.method == "vaa":
            sampler = GroupSampler(2, eta_q=0.007, q_min=0.1, q_max=0.9)
            vaa = VAAStep(sampler, rho=0.4, total_steps=steps, schedule=make_schedule("linear", 1.0), objective="stochastic",
                          seed=0)
            step = lambda m, b, e, _v=vaa: _v(m, lambda _group: b, e)  # noqa: E731  VAA asks for its group's batch
        elif c.method == "safegrad":
            with precision.autocast(c.autocast):
                ref = safegrad_reference(FinetuneConfig(lora=lora, safegrad=sg_cfg), engine, None, safe_rows, pad)
            step = SafeGradStep(itertools.cycle(safe).__next__, align_loss="kl", reference=ref, mode="global", cadence=4)
        else:
            step = sft_step
        model.train()
        runners[name] = (model, engine, step)

    for rnd in range(args.rounds):
        orders = {b: epoch_order(enc, args.batch_size, 0, rnd, bucketed=b) for b in (False, True)}
        for i in range(len(orders[False])):
            for name, c in contenders.items():
                model, engine, step = runners[name]
                batch = collate([enc[j] for j in orders[c.bucketed][i]], pad)
                start = time.perf_counter()
                with precision.autocast(c.autocast):
                    stats = step(model, batch, engine)
                c.seconds.append(time.perf_counter() - start)
                c.tokens += int(batch["attention_mask"].sum())
                c.padded_tokens += batch["input_ids"].numel()
                c.backward.append(stats.get("n_backward", 1))
            print(f"round {rnd + 1}/{args.rounds} batch {i + 1}/{len(orders[False])}", file=sys.stderr)

    del runners
    ceil = ceilings()
    params = sum(p.numel() for p in load_model(model_dir)[0].parameters())
    row: dict = {"bench": "training", "model": args.model, "threads": args.threads, "rows": args.rows,
                 "batch_size": args.batch_size, "max_length": args.max_length, "steps": steps, "bf16_cpu": bf16 is not None,
                 **ceil}
    for name, c in contenders.items():
        total = sum(c.seconds)
        rate = c.tokens / total
        shape = "bfloat16" if c.autocast else "float32"
        per_token = flops_per_token(params, "train", lora=True, recompute=c.checkpointing)
        row[f"{name}_tokens_per_s"] = round(rate, 1)
        row[f"{name}_step_s"] = round(statistics.median(c.seconds), 3)
        row[f"{name}_padding_share"] = round(1 - c.tokens / c.padded_tokens, 3)
        row[f"{name}_ceiling_share"] = round(rate * per_token / 1e9 / ceil[f"ceiling_train_{shape}_gflops"], 3)
    r = {k: row[f"{k}_tokens_per_s"] for k in contenders}
    if bf16:
        row["bf16_vs_fp32"] = round(r["sft_bf16_padded"] / r["sft_fp32_padded"], 2)
    row["bucketed_vs_padded"] = round(r[f"sft_{fast}_bucketed"] / r[f"sft_{fast}_padded"], 2)
    row["best_vs_fp32_padded"] = round(r[f"sft_{fast}_bucketed"] / r["sft_fp32_padded"], 2)
    row["best_vs_old"] = round(r[f"sft_{fast}_bucketed"] / r["sft_fp32_padded_ckpt"], 2)
    row["checkpointing_cost"] = round(r["sft_fp32_padded"] / r["sft_fp32_padded_ckpt"], 2)  # the same batches
    sft = contenders[f"sft_{fast}_bucketed"]
    for name in ("vaa", "safegrad_k4"):
        c = contenders[name]
        row[f"{name}_vs_sft"] = round(sum(c.seconds) / sum(sft.seconds), 3)
        row[f"{name}_mean_backward"] = round(statistics.mean(c.backward), 3)
    for name in (f"sft_{fast}_bucketed", "vaa", "safegrad_k4"):
        c, n = contenders[name], len(contenders[name].seconds)
        parts = {k: 1000 * c.clock[k] / n for k in ("grad", "backward", "step")}
        parts["rest"] = 1000 * sum(c.seconds) / n - sum(parts.values())
        row[f"{name}_ms_per_step"] = {("probe_grad" if k == "grad" else k): round(v, 1) for k, v in parts.items()}
    row["targets"] = {"vaa_vs_sft": "<= 1.5", "safegrad_k4_vs_sft": "<= 1.3"}
    print(json.dumps(row), file=out)


if __name__ == "__main__":
    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # libraries print to stdout; only the JSON line goes there
        main(real_stdout)
