"""Step-time overhead of the alignment methods vs SFT, measured side by side, one JSON line.

    python jobs/bench/overhead.py --config configs/quickstart.yaml [--steps 60]

Same model (the config's base), same batches (the config's alignment pairs, batch size
align.batch_size), same engine; the methods' steps are interleaved round by round so that machine
noise hits all of them alike. Ratios are of median step times, except the stochastic VAA form's,
which mixes 1- and 2-backward steps and is compared by total time. VAA runs over a full
linear 0 -> 1 curriculum of `--steps` steps, so its stochastic form averages 1.5 backward passes.
Methods not implemented yet (Vaccine, Booster, RepNoise) are not reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "platform"))

import torch  # noqa: E402

from hftlab.algorithms.curriculum import make_schedule  # noqa: E402
from hftlab.algorithms.sampler import GroupSampler  # noqa: E402
from hftlab.algorithms.sft import sft_step  # noqa: E402
from hftlab.algorithms.vaa import VAAStep  # noqa: E402
from hftlab.config import load_config  # noqa: E402
from hftlab.models.loading import load_model  # noqa: E402
from hftlab.pipeline import base_model, plan  # noqa: E402
from hftlab.training.batches import collate, encode  # noqa: E402
from hftlab.training.engine import LocalEngine  # noqa: E402


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
    enc = encode(tokenizer, p.align_pairs[: bs * 8], cfg.data.template, cfg.base.max_length)
    batches = [collate(enc[i : i + bs], tokenizer.pad_token_id) for i in range(0, len(enc), bs)]

    contenders = {}
    for name, objective in (("sft", None), ("vaa_stochastic", "stochastic"), ("vaa_weighted", "weighted")):
        model, _ = load_model(base)
        engine = LocalEngine(model, cfg.align.lr)
        if objective is None:
            step = sft_step
        else:
            vaa = cfg.align.vaa
            sampler = GroupSampler(2, eta_q=vaa.eta_q, q_min=vaa.q_min, q_max=vaa.q_max)
            step = VAAStep(sampler, rho=vaa.rho or 0.4, total_steps=args.steps, schedule=make_schedule("linear", 1.0),
                           objective=objective, seed=cfg.seed)
        contenders[name] = (model, engine, step, [], [])

    for i in range(args.steps):
        batch = batches[i % len(batches)]
        for name, (model, engine, step, times, backs) in contenders.items():
            model.train()
            start = time.perf_counter()
            if name == "sft":
                step(model, batch, engine)
                backs.append(1)
            else:
                backs.append(step(model, lambda _g, b=batch: b, engine)["n_backward"])
            times.append(time.perf_counter() - start)

    median = {name: statistics.median(c[3]) for name, c in contenders.items()}
    print(json.dumps({
        "bench": "overhead", "config": args.config, "steps": args.steps, "batch_size": bs,
        "threads": torch.get_num_threads(), "sft_step_ms": round(1000 * median["sft"], 2),
        # the stochastic form mixes 1- and 2-backward steps: its median says nothing, its total time does
        "vaa_stochastic_vs_sft": round(sum(contenders["vaa_stochastic"][3]) / sum(contenders["sft"][3]), 3),
        "vaa_stochastic_mean_backward": round(statistics.mean(contenders["vaa_stochastic"][4]), 3),
        "vaa_weighted_vs_sft": round(median["vaa_weighted"] / median["sft"], 3),
        "targets": {"vaa_stochastic_vs_sft": "<= 1.5 (paper: VAA 1.5x)"},
    }), file=out)


if __name__ == "__main__":
    import contextlib

    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # libraries print to stdout; only the JSON line goes there
        main(real_stdout)
