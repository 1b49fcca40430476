"""Benchmark of VAA stage 1's matrix: Ray Data with 1 and 2 actors vs a naive loop, one JSON line.

    python jobs/bench/groups.py --config configs/quickstart.yaml [overrides]

Same inputs for every contender: the config's alignment set x the checkpoints of one real proxy
run (the aligned model + T checkpoints). The naive loop is the reference code's way: one example
at a time, the model reloaded for every checkpoint; it runs on a subset (--naive-examples) and is
compared by rate (examples judged per second). Every contender gets the same torch threads as one
actor (groups.threads_per_actor). Also: the cost of the generation-free loss score vs generating
and judging, in-process, on the same subset.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "platform"))

import torch  # noqa: E402

from hftlab.config import load_config  # noqa: E402
from hftlab.generation.hf import HFGenerator  # noqa: E402
from hftlab.groups.matrix import build_matrix, response_losses  # noqa: E402
from hftlab.groups.proxy import run_proxy  # noqa: E402
from hftlab.judges import make_judge  # noqa: E402
from hftlab.models.loading import load_model  # noqa: E402
from hftlab.pipeline import base_model, plan, train_stage  # noqa: E402
from hftlab.tracking import Tracker  # noqa: E402


def naive(cfg, examples, checkpoints) -> float:
    """Examples judged per second, one at a time, model reloaded per checkpoint."""
    judge = make_judge(cfg.eval.judge)
    start = time.perf_counter()
    for path in checkpoints:
        model, tok = load_model(path)
        gen = HFGenerator(model, tok, template=cfg.data.template, max_new_tokens=cfg.eval.max_new_tokens,
                          batch_size=1, progress=False)
        for ex in examples:
            judge.judge([ex.prompt], gen.generate([ex.prompt]))
    return len(examples) * len(checkpoints) / (time.perf_counter() - start)


def score_costs(cfg, examples, checkpoints) -> tuple[float, float]:
    """Seconds for batched generation + judging vs one loss forward pass, same examples and checkpoints."""
    judge, gen_s, loss_s = make_judge(cfg.eval.judge), 0.0, 0.0
    for path in checkpoints:
        model, tok = load_model(path)
        start = time.perf_counter()
        gen = HFGenerator(model, tok, template=cfg.data.template, max_new_tokens=cfg.eval.max_new_tokens,
                          batch_size=cfg.eval.batch_size, progress=False)
        prompts = [e.prompt for e in examples]
        judge.judge(prompts, gen.generate(prompts))
        gen_s += time.perf_counter() - start
        start = time.perf_counter()
        response_losses(model, tok, [(e.prompt, e.response) for e in examples], template=cfg.data.template,
                        max_length=cfg.base.max_length)
        loss_s += time.perf_counter() - start
    return gen_s, loss_s


def main(out=sys.stdout) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--naive-examples", type=int, default=150)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.config, ["tracking.enabled=false", *args.overrides])
    p = plan(cfg, proxies=True)
    log = lambda *a: print(*a, file=sys.stderr)  # noqa: E731  (stdout carries only the JSON line)
    with Tracker(cfg) as tracker:
        aligned = train_stage(cfg, "align", base_model(cfg, log), p.align_pairs, tracker, log)
    proxy = cfg.groups.proxies[0]
    checkpoints = run_proxy(cfg, proxy, aligned, p.proxy_tasks[proxy.task], p.harmful, log)
    examples, rows = p.alignment, len(p.alignment) * len(checkpoints)

    import ray

    ray.init(num_cpus=max(2, int(2 * cfg.groups.cpus_per_actor)), log_to_driver=False)
    rates = {}
    for actors in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            matrix = build_matrix(cfg, examples, checkpoints, Path(tmp) / "m", actors=actors)
            rates[actors] = len(matrix) / (time.perf_counter() - start)
            assert len(matrix) == rows
    ray.shutdown()

    torch.set_num_threads(cfg.groups.threads_per_actor)
    subset = examples[: args.naive_examples]
    naive_rate = naive(cfg, subset, checkpoints)
    gen_s, loss_s = score_costs(cfg, subset, checkpoints)
    print(json.dumps({
        "bench": "groups", "config": args.config, "examples": len(examples), "checkpoints": len(checkpoints),
        "naive_subset": len(subset), "threads_per_contender": cfg.groups.threads_per_actor,
        "naive_per_s": round(naive_rate, 2), "ray_1_actor_per_s": round(rates[1], 2), "ray_2_actors_per_s": round(rates[2], 2),
        "ray_2_actors_vs_naive": round(rates[2] / naive_rate, 2), "ray_1_actor_vs_naive": round(rates[1] / naive_rate, 2),
        "two_vs_one_actor": round(rates[2] / rates[1], 2),
        "loss_score_vs_generation_cost": round(loss_s / gen_s, 3),
        "targets": {"ray_2_actors_vs_naive": ">= 10", "two_vs_one_actor": ">= 1.6"},
    }), file=out)


if __name__ == "__main__":
    import contextlib

    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # libraries print to stdout; only the JSON line goes there
        main(real_stdout)
