"""`jobs/bench/groups.py --real`: VAA stage 1's matrix at real-model scale, the Ray Data pipeline on vLLM against the
reference code's loop, one JSON line.

    python jobs/bench/groups.py --real [--examples 256] [--checkpoints 4] [--new-tokens 64] [--naive-examples 16]
                                       [--ray-data-llm] [overrides]

Inputs, from configs/real/smollm2-beavertails.yaml: SmolLM2-135M-Instruct in its chat template, --examples BeaverTails
alignment pairs, the aligned model = the config's LoRA alignment stage with 0 epochs (a fresh adapter: what the matrix
costs does not depend on what alignment taught), and a proxy harmful fine-tuning (full weights, the config's local
Alpaca rows + BeaverTails harmful pairs, p = 0.25, batch 8) with a checkpoint every step: T = --checkpoints.
Contenders, each with the whole machine (vLLM's engine binds every core; the loop gets as many torch threads):
- `pipeline`: groups/matrix.build_matrix with groups.backend=vllm on Ray Data, one actor: generation, judge and the
  loss score of every (checkpoint, example), end to end (actor and engine start inside; the aligned adapter's merged
  copy is made before, once, as `hftlab groups` caches it, and timed apart);
- `naive`: the reference code's loop (ChanLiang/VAA's `query`): the model reloaded per checkpoint, HF `generate` on
  one example at a time, judged; on --naive-examples of the examples and every checkpoint, compared by rate;
- `loss_score`: the same matrix with groups.method=loss, nothing generated or judged: the safe response's loss of every
  row from vLLM's prompt log-probabilities and, apart, from one HF forward pass (2 torch threads); each one's rows/s
  against the pipeline's, the largest gap between its losses and the pipeline's; and the score's AUROC / Spearman
  against this matrix's ForgotNum (a bench-size proxy: T checkpoints of `--examples` pairs, not the real stage 1);
- `ray_data_llm` (--ray-data-llm): ray.data.llm's vLLM engine processor, one per model (it binds an engine to one
  model), generation only, the same rows.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REAL = REPO / "configs" / "real" / "smollm2-beavertails.yaml"


def sig(x: float, digits: int = 4) -> float:
    """`digits` significant digits: a rate of 0.2 rows/s keeps its precision (2 decimals would not), so the printed
    ratio agrees with the printed rates' ratio to within 0.2%."""
    return float(f"{x:.{digits}g}")


def setup(args, log):
    """(cfg, examples, [aligned, ckpt 1..T]) as the module docstring says."""
    from hftlab.config import load_config
    from hftlab.groups.proxy import run_proxy
    from hftlab.run.inputs import _task, plan
    from hftlab.run.stages import base_model, train_stage
    from hftlab.tracking.logger import Tracker

    t = args.checkpoints
    cfg = load_config(REAL, ["tracking.enabled=false", "data.refusals.n=0", f"align.n_alignment={args.examples}",
                             "align.epochs=0", f"eval.max_new_tokens={args.new_tokens}", "groups.actors=1",
                             "groups.batch_size=64", "eval.batch_size=64",
                             f"groups.proxies=[{{task: alpaca, n: {8 * t}, poison_ratio: 0.25, epochs: 1, lr: 1.0e-4, "
                             "batch_size: 8, checkpoint_every: 1}]",
                             "eval.judge.kind=refusal", "eval.judge.compare=[]",  # the keyword judge on both sides
                             *args.overrides])
    p = plan(cfg)
    with Tracker(cfg) as tracker:
        aligned = train_stage(cfg, "align", base_model(cfg, log), p.align_pairs, tracker, log)
    task = _task(cfg, "alpaca", "finetune.train_source", False, cfg.finetune.train_source)
    checkpoints = run_proxy(cfg, cfg.groups.proxies[0], aligned, task, p.harmful, log)
    assert len(checkpoints) == t + 1, checkpoints
    return cfg, p.alignment, checkpoints


def naive_rate(cfg, examples, checkpoints, reference_generate) -> float:
    """Examples judged per second: the model reloaded per checkpoint, HF generate on one example at a time."""
    from hftlab.data.template import prompt_text
    from hftlab.judges import make_judge
    from hftlab.models.loading import load_model

    judge = make_judge(cfg.eval.judge)
    start = time.perf_counter()
    for path in checkpoints:
        model, tok = load_model(path, dtype=cfg.base.dtype)
        for ex in examples:
            answers = reference_generate(model, tok, [prompt_text(ex.prompt, cfg.data.template, tok)], cfg.eval.max_new_tokens,
                                         add_special_tokens=False)
            judge.judge([ex.prompt], answers)
    return len(examples) * len(checkpoints) / (time.perf_counter() - start)


def ray_data_llm_seconds(cfg, examples, models: list[str]) -> float:
    """ray.data.llm's vLLM processor over the same rows, one processor (engine) per model, one after the other."""
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig
    from transformers import AutoTokenizer

    from hftlab.data.template import prompt_text

    tok = AutoTokenizer.from_pretrained(models[0])
    rows = [{"id": e.id, "prompt": prompt_text(e.prompt, cfg.data.template, tok)} for e in examples]
    n_new = cfg.eval.max_new_tokens
    start = time.perf_counter()
    for path in models:
        config = vLLMEngineProcessorConfig(
            model_source=path, concurrency=1, batch_size=cfg.groups.batch_size, log_engine_metrics=False,
            engine_kwargs=dict(dtype=cfg.base.dtype, max_model_len=cfg.eval.vllm.max_model_len, enforce_eager=True,
                               kv_cache_memory_bytes=int(cfg.eval.vllm.kv_cache_gib * 2**30)),
            placement_group_config={"bundles": [{"CPU": 1}]})
        processor = build_processor(
            config, preprocess=lambda row: dict(prompt=row["prompt"], sampling_params=dict(temperature=0.0, max_tokens=n_new)),
            postprocess=lambda row: dict(answer=row["generated_text"]))
        got = processor(ray.data.from_items(rows)).take_all()
        assert len(got) == len(rows)
    return time.perf_counter() - start


def main_real(args, out, reference_generate) -> None:
    import ray
    import torch

    from hftlab.generation.vllm import serving
    from hftlab.groups.matrix import build_matrix
    from hftlab.groups.vulnerability import aggregate, agreement, forgot_num
    from hftlab.storage import cache_root

    log = lambda *a: print(*a, file=sys.stderr)  # noqa: E731
    cfg, examples, checkpoints = setup(args, log)
    start = time.perf_counter()
    served = serving(checkpoints[0], cache_root(cfg), dtype=cfg.base.dtype, merge_lora=True).base  # made once, cached
    merge_s = time.perf_counter() - start
    torch.set_num_threads(2)
    ray.init(address="local", num_cpus=2, log_to_driver=False)
    vllm_cfg = replace(cfg, groups=replace(cfg.groups, backend="vllm"))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        matrix = build_matrix(vllm_cfg, examples, [checkpoints], Path(tmp) / "m.parquet")
        pipeline_s = time.perf_counter() - start
    rows = len(examples) * len(checkpoints)
    assert len(matrix) == rows
    loss_s, scored = {}, {}
    for backend in ("vllm", "hf"):  # the loss alone on each backend: prompt log-probabilities, or one HF forward pass
        loss_cfg = replace(cfg, groups=replace(cfg.groups, method="loss", backend=backend, threads_per_actor=2))
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            scored[backend] = build_matrix(loss_cfg, examples, [checkpoints], Path(tmp) / "m.parquet")
            loss_s[backend] = time.perf_counter() - start
        assert len(scored[backend]) == rows and (scored[backend]["answer"] == "").all()
    groups = aggregate([forgot_num(matrix)])
    by_row = ["checkpoint", "id"]
    loss_gap = {b: float((m.set_index(by_row)["loss"] - matrix.set_index(by_row)["loss"]).abs().max()) for b, m in scored.items()}
    llm_s = ray_data_llm_seconds(cfg, examples, [served, *checkpoints[1:]]) if args.ray_data_llm else None
    ray.shutdown()
    subset = examples[: args.naive_examples]
    naive = naive_rate(cfg, subset, checkpoints, reference_generate)
    pipeline = rows / pipeline_s
    print(json.dumps({
        "bench": "groups", "mode": "real", "model": cfg.base.name_or_path, "examples": len(examples),
        "checkpoints": len(checkpoints), "new_tokens": cfg.eval.max_new_tokens, "naive_subset": len(subset),
        "pipeline": "ray data, 1 actor, groups.backend=vllm (judge and loss score included)",
        "pipeline_s": round(pipeline_s, 1), "merge_aligned_adapter_s": round(merge_s, 1),
        "pipeline_per_s": sig(pipeline), "naive_per_s": sig(naive), "pipeline_vs_naive": sig(pipeline / naive),
        "answered_share_nonempty": round(float((matrix["answer"].str.len() > 0).mean()), 3),
        "loss_score": "ray data, 1 actor, groups.method=loss (no generation, no judge), on vllm and on hf (2 threads)",
        **{k: v for b in ("vllm", "hf") for k, v in {
            f"loss_{b}_s": round(loss_s[b], 1), f"loss_{b}_per_s": sig(rows / loss_s[b]),
            f"loss_{b}_vs_pipeline": sig(pipeline_s / loss_s[b]), f"loss_{b}_max_abs_gap": sig(loss_gap[b], 3)}.items()},
        "vulnerable_share": round(float(groups["group"].mean()), 3),
        **{k: round(v, 3) for k, v in agreement(groups).items()},
        **({"ray_data_llm_s": round(llm_s, 1), "ray_data_llm_per_s": sig(rows / llm_s),
            "pipeline_vs_ray_data_llm": round(llm_s / pipeline_s, 2)} if llm_s else {}),
        "targets": {"pipeline_vs_naive": ">= 10", "loss_vllm_vs_pipeline": ">= 10", "loss_hf_vs_pipeline": ">= 10"},
    }), file=out)
