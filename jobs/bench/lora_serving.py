"""Benchmark: a LoRA stage answered by vLLM through a LoRARequest vs as a merged copy, one JSON line.

    python jobs/bench/lora_serving.py [--prompts 96] [--new-tokens 64] [--batch-size 32] [--adapter DIR]

The pipeline's aligned and fine-tuned models are LoRA stages (adapter + parent). vLLM serves one either as the
parent with the adapter per request (`eval.vllm.lora: request`: the engine runs LoRA kernels on every token) or as a
full copy with the adapter merged in (`merge`: made once per content, generation/vllm.merged_copy, then plain
decoding). The adapter is --adapter (a stage directory) or, by default, a fresh LoRA of the real config's alignment
settings on SmolLM2-135M-Instruct with its B matrices drawn at random (peft starts them at 0, which would make both
contenders trivially equal). Each contender gets its own engine, every core (eval.vllm.cpu_cores=all); start-up and
the merge are timed apart from generation. Reported: tokens/s of each (median of --repeats), their ratio, and the
share of prompts whose greedy answers are identical (fp32 both; merged weights round differently, so not all).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "platform"))


def make_adapter(base: str, out: Path, seed: int = 0) -> str:
    """A LoRA stage on `base` with the real config's alignment LoRA, B drawn from N(0, 0.02^2)."""
    import torch

    from hftlab.config import load_config
    from hftlab.models.loading import add_lora, load_model, save_stage

    cfg = load_config(REPO / "configs" / "real" / "smollm2-beavertails.yaml", ["tracking.enabled=false"])
    model, tok = load_model(base)
    model = add_lora(model, cfg.align.lora)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    save_stage(model, tok, out, base)
    return str(out)


def main(out=sys.stdout) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a named model (models/sources.py) or a path")
    ap.add_argument("--adapter", default=None, help="a LoRA stage directory (default: a fresh random one)")
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--data", default=os.environ.get("HFTLAB_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--cache", default=os.environ.get("HFTLAB_CACHE", str(Path.home() / ".cache" / "hftlab")))
    args = ap.parse_args()
    log = lambda *a: print(*a, file=sys.stderr)  # noqa: E731

    from hftlab.config.evaluation import VLLMConfig
    from hftlab.generation.vllm import VLLMGenerator, merged_copy
    from hftlab.models.sources import resolve

    base = resolve(args.model, Path(args.cache), log=log)
    rows = [json.loads(line) for line in (Path(args.data) / "beavertails" / "30k_test_unsafe_filtered.jsonl").open()]
    prompts = [r["prompt"] for r in rows[: args.prompts]]
    with tempfile.TemporaryDirectory() as tmp:
        adapter = args.adapter or make_adapter(base, Path(tmp) / "stage")
        cache = Path(tmp) / "cache"  # a fresh merge, timed
        t0 = time.perf_counter()
        merged_copy(adapter, cache, dtype="float32", trust_remote_code=False)
        merge_s = time.perf_counter() - t0
        row: dict = {"bench": "lora_serving", "prompts": len(prompts), "new_tokens": args.new_tokens,
                     "batch_size": args.batch_size, "merge_s": round(merge_s, 2)}
        answers = {}
        for name, merge in (("request", False), ("merged", True)):
            t0 = time.perf_counter()
            gen = VLLMGenerator(adapter, template="chat", max_new_tokens=args.new_tokens, batch_size=args.batch_size,
                                cache=cache, settings=VLLMConfig(), merge_lora=merge)
            start_s = time.perf_counter() - t0
            rates = []
            try:
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    answers[name] = gen.generate(prompts)
                    seconds = time.perf_counter() - t0
                    tokens = sum(len(gen.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers[name])
                    rates.append(tokens / seconds)
            finally:
                gen.close()
            row[f"{name}_start_s"] = round(start_s, 1)
            row[f"{name}_tokens_per_s"] = round(statistics.median(rates), 1)
            log(f"{name}: {row[f'{name}_tokens_per_s']} tokens/s")
        row["merged_vs_request"] = round(row["merged_tokens_per_s"] / row["request_tokens_per_s"], 2)
        same = sum(a == b for a, b in zip(answers["request"], answers["merged"], strict=True))
        row["identical_answers"] = round(same / len(prompts), 3)
    print(json.dumps(row), file=out, flush=True)


if __name__ == "__main__":
    # vLLM's engine processes write to file descriptor 1: everything goes to stderr, only the JSON line to stdout
    real_stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    with contextlib.redirect_stdout(sys.stderr):
        main(real_stdout)
    real_stdout.flush()
