"""Benchmark of VAA stage 1's matrix: Ray Data with 1 and 2 actors vs a naive loop, one JSON line.

    python jobs/bench/groups.py --config configs/quickstart.yaml [overrides]
    python jobs/bench/groups.py --real [...]     # SmolLM2 on vLLM vs the reference loop: see groups_real.py

Same inputs for every contender: the config's alignment set x the checkpoints of one real proxy
run (the aligned model + T checkpoints). The naive loop is the reference code's way
(ChanLiang/VAA's `query`): HF `model.generate` on one example at a time, the model reloaded for
every checkpoint; it runs on a subset (--naive-examples) and is compared by rate (examples judged
per second). Every contender gets the same torch threads as one actor (groups.threads_per_actor).

The pipeline's rates are end to end: starting the actors (a Python process importing torch and
transformers, then the first model load) is inside them. That start is also measured on its own,
as the wall time of a matrix of one batch per actor, and the rates past it are reported beside the
end-to-end ones (rows beyond the start run / seconds beyond it): what a larger matrix tends to. So is
the machine's own ceiling for 2 vs 1 actors: two plain processes generating at once vs one, no Ray.
And what hftlab's allocator setting (allocator.py, on in every hftlab process) is worth: one plain
process generating with it vs one without, the medians of --repeats interleaved pairs.
Rounds are interleaved (--repeats) and the medians reported. Also: the cost of the generation-free
loss score vs generating and judging, in-process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "platform"))

import torch  # noqa: E402

from hftlab.allocator import FREED_MEMORY_ENV  # noqa: E402
from hftlab.config import load_config  # noqa: E402
from hftlab.data.template import prompt_text  # noqa: E402
from hftlab.generation.hf import HFGenerator  # noqa: E402
from hftlab.groups.matrix import build_matrix, response_losses  # noqa: E402
from hftlab.groups.proxy import run_proxy  # noqa: E402
from hftlab.judges import make_judge  # noqa: E402
from hftlab.models.loading import load_model  # noqa: E402
from hftlab.run.pipeline import base_model, plan, train_stage  # noqa: E402
from hftlab.tracking.logger import Tracker  # noqa: E402


def reference_generate(model, tok, texts: list[str], max_new_tokens: int, add_special_tokens: bool = True) -> list[str]:
    """The reference code's decoding: HF `generate`, greedy, on left-padded texts already in the template."""
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens).to(model.device)
    out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return [t.strip() for t in tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]


def naive(cfg, examples, checkpoints) -> float:
    """Examples judged per second, one at a time, model reloaded per checkpoint."""
    judge = make_judge(cfg.eval.judge)
    start = time.perf_counter()
    for path in checkpoints:
        model, tok = load_model(path)
        for ex in examples:
            answers = reference_generate(model, tok, [prompt_text(ex.prompt, cfg.data.template)], cfg.eval.max_new_tokens)
            judge.judge([ex.prompt], answers)
    return len(examples) * len(checkpoints) / (time.perf_counter() - start)


def timed_matrix(cfg, examples, checkpoints, actors: int) -> float:
    """Seconds for the whole Ray Data matrix of one proxy run, start of the actor pool included."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        matrix = build_matrix(cfg, examples, [checkpoints], Path(tmp) / "m", actors=actors)
        seconds = time.perf_counter() - start
    assert len(matrix) == len(examples) * len(checkpoints)
    return seconds


def _generate_alone(path: str, template: str, max_new_tokens: int, batch_size: int, prompts: list[str], barrier, rates) -> None:
    torch.set_num_threads(1)
    model, tok = load_model(path)
    gen = HFGenerator(model, tok, template=template, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False)
    gen.generate(prompts[:batch_size])  # warm
    barrier.wait()
    start = time.perf_counter()
    gen.generate(prompts)
    rates.put(len(prompts) / (time.perf_counter() - start))


def spawned_rate(cfg, prompts: list[str], path: str, n: int, env: dict[str, str] | None = None) -> float:
    """Rows/s of n plain processes generating at once (spawned, no Ray), with `env` added to theirs."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, rates = ctx.Barrier(n), ctx.Queue()
    args = (path, cfg.data.template, cfg.eval.max_new_tokens, cfg.eval.batch_size, prompts, barrier, rates)
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})  # a spawned child starts with the parent's environment as it is now
    try:
        procs = [ctx.Process(target=_generate_alone, args=args) for _ in range(n)]
        for proc in procs:
            proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    total = sum(rates.get(timeout=600) for _ in procs)
    for proc in procs:
        proc.join()
    return total


def engine_vs_hf_generate(cfg, prompts: list[str], path: str) -> float:
    """Our batched decoding (rows leave at EOS) vs HF `generate` on the same sorted batches, rows/s ratio."""
    model, tok = load_model(path)
    ours = HFGenerator(model, tok, template=cfg.data.template, max_new_tokens=cfg.eval.max_new_tokens,
                       batch_size=cfg.eval.batch_size, progress=False)
    texts = sorted((prompt_text(p, cfg.data.template) for p in prompts), key=len)
    batches = [texts[i : i + cfg.eval.batch_size] for i in range(0, len(texts), cfg.eval.batch_size)]

    def hf() -> None:
        for batch in batches:
            reference_generate(model, tok, batch, cfg.eval.max_new_tokens)

    def engine() -> None:
        for batch in batches:
            ours.greedy(batch)

    times: dict[str, list[float]] = {"hf": [], "ours": []}
    for _ in range(3):
        for name, fn in (("hf", hf), ("ours", engine)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["hf"]) / statistics.median(times["ours"])


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


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def main(out=sys.stdout) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--naive-examples", type=int, default=None, help="the naive loop's subset (150; --real: 16)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the JSON line has the medians")
    ap.add_argument("--real", action="store_true", help="real-model scale on vLLM (jobs/bench/groups_real.py)")
    ap.add_argument("--examples", type=int, default=256, help="--real: alignment examples")
    ap.add_argument("--checkpoints", type=int, default=4, help="--real: proxy checkpoints T")
    ap.add_argument("--new-tokens", type=int, default=64, help="--real: new tokens per answer")
    ap.add_argument("--ray-data-llm", action="store_true", help="--real: also ray.data.llm's vLLM processor")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.real:
        from groups_real import main_real

        args.naive_examples = args.naive_examples or 16
        return main_real(args, out, reference_generate)
    args.naive_examples = args.naive_examples or 150
    cfg = load_config(args.config, ["tracking.enabled=false", *args.overrides])
    p = plan(cfg, proxies=True)
    log = lambda *a: print(*a, file=sys.stderr)  # noqa: E731  (stdout carries only the JSON line)
    with Tracker(cfg) as tracker:
        aligned = train_stage(cfg, "align", base_model(cfg, log), p.align_pairs, tracker, log)
    proxy = cfg.groups.proxies[0]
    checkpoints = run_proxy(cfg, proxy, aligned, p.proxy_tasks[proxy.task], p.harmful, log)
    examples, rows = p.alignment, len(p.alignment) * len(checkpoints)

    import ray

    ray.init(address="local", num_cpus=max(2, int(2 * cfg.groups.cpus_per_actor)), log_to_driver=False)  # our own
    torch.set_num_threads(cfg.groups.threads_per_actor)
    subset = examples[: args.naive_examples]
    runs: dict[str, list[float]] = {"naive": [], "ray_1": [], "ray_2": [], "start_1": [], "start_2": []}
    start_rows = {a: min(len(examples), a * cfg.groups.batch_size) for a in (1, 2)}  # one batch per actor
    for _ in range(args.repeats):  # interleaved rounds, medians: this VM's speed drifts by 10-20% over minutes
        for actors in (1, 2):
            runs[f"start_{actors}"].append(timed_matrix(cfg, examples[: start_rows[actors]], checkpoints[:1], actors))
            runs[f"ray_{actors}"].append(timed_matrix(cfg, examples, checkpoints, actors))
        runs["naive"].append(naive(cfg, subset, checkpoints))
    ray.shutdown()
    med = {k: statistics.median(v) for k, v in runs.items()}
    rate = {a: rows / med[f"ray_{a}"] for a in (1, 2)}  # end to end
    # past the start: the rows beyond the start run over the seconds beyond it. Two separately timed runs: on a busy
    # machine the difference can come out <= 0, and then the rate is not measured (null), never negative
    marginal = {a: (rows - start_rows[a]) / (med[f"ray_{a}"] - med[f"start_{a}"])
                if med[f"ray_{a}"] > med[f"start_{a}"] else None for a in (1, 2)}
    gen_s, loss_s = score_costs(cfg, subset, checkpoints)
    alone = (cfg, [e.prompt for e in examples], checkpoints[-1])
    one: dict[str, list[float]] = {"on": [], "off": []}  # one plain process, hftlab's allocator setting on / off
    for _ in range(args.repeats):
        one["on"].append(spawned_rate(*alone, 1))
        one["off"].append(spawned_rate(*alone, 1, {FREED_MEMORY_ENV: "0"}))
    two_processes = spawned_rate(*alone, 2)
    print(json.dumps({
        "bench": "groups", "config": args.config, "examples": len(examples), "checkpoints": len(checkpoints),
        "naive_subset": len(subset), "threads_per_contender": cfg.groups.threads_per_actor, "rounds": args.repeats,
        "naive_per_s": round(med["naive"], 2), "ray_1_actor_per_s": round(rate[1], 2), "ray_2_actors_per_s": round(rate[2], 2),
        "ray_2_actors_vs_naive": round(rate[2] / med["naive"], 2), "ray_1_actor_vs_naive": round(rate[1] / med["naive"], 2),
        "two_vs_one_actor": round(rate[2] / rate[1], 2),
        "two_vs_one_actor_per_round": [round(a / b, 2) for a, b in zip(runs["ray_1"], runs["ray_2"], strict=True)],
        "ray_1_actor_s": round(med["ray_1"], 2), "ray_2_actors_s": round(med["ray_2"], 2),
        "pool_start_1_actor_s": round(med["start_1"], 2), "pool_start_2_actors_s": round(med["start_2"], 2),
        "past_start_ray_1_actor_per_s": _round(marginal[1]), "past_start_ray_2_actors_per_s": _round(marginal[2]),
        "past_start_ray_2_actors_vs_naive": _round(marginal[2] and marginal[2] / med["naive"]),
        "past_start_two_vs_one_actor": _round(marginal[1] and marginal[2] and marginal[2] / marginal[1]),
        "two_vs_one_process_no_ray": round(two_processes / statistics.median(one["on"]), 2),
        # hftlab keeps freed memory mapped (allocator.py); the same decoding in a process where it is off
        "keep_freed_memory_speedup": round(statistics.median(a / b for a, b in zip(one["on"], one["off"], strict=True)), 2),
        "loss_score_vs_generation_cost": round(loss_s / gen_s, 3),
        "engine_vs_hf_generate": round(engine_vs_hf_generate(cfg, [e.prompt for e in examples], checkpoints[-1]), 2),
        "targets": {"ray_2_actors_vs_naive": ">= 10", "two_vs_one_actor": ">= 1.6"},
    }), file=out)


if __name__ == "__main__":  # required: --real starts vLLM engines, whose processes are spawned
    import contextlib

    # libraries print to stdout, vLLM's engine processes to file descriptor 1: all of it goes to stderr, and only the
    # JSON line to the real stdout
    real_stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    with contextlib.redirect_stdout(sys.stderr):
        main(real_stdout)
    real_stdout.flush()
