"""What a run costs before it runs: model sizes, accelerators, and the arithmetic from tokens to GPU-hours.

Nothing here loads a model or reaches a hub: a model's size comes from the table below (by HF name) or from a
local directory's `config.json` (read as JSON, no weights). The estimates are the standard ones, each constant
stated where it is used, so a reader can check them by hand:
- training: 6 N FLOPs per token with every weight trained, 4 N under LoRA (forward 2 N, backward through the
  activations 2 N, no weight gradients for the frozen base), + 2 N with gradient checkpointing (one more forward),
  times the method's passes per step (its record's `passes`, training/builtin_methods.py), at TRAIN_MFU of the
  accelerator's dense bf16 peak;
- prompt processing (prefill, judging): 2 N FLOPs per token at PREFILL_MFU;
- decoding: memory-bound, one read of the weights per step for a whole batch: batch x bandwidth x DECODE_EFF /
  (N x bytes per weight) tokens per second.
Peaks are the vendors' datasheet numbers (dense, no sparsity). Measured tokens/s on a GPU replace them once a GPU
check has run (docs/gpu-validation.md); until then every estimate says it is one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hftlab.config.errors import ConfigError


@dataclass(frozen=True)
class Accelerator:
    name: str
    bf16_tflops: float
    """Dense bf16 peak, TFLOP/s (datasheet)."""
    memory_gb: float
    bandwidth_tbs: float
    """HBM bandwidth, TB/s (datasheet)."""
    source: str


ACCELERATORS = {a.name: a for a in (
    Accelerator("h100", 989.0, 80.0, 3.35, "NVIDIA H100 SXM5 datasheet (2023): 989 TFLOPS bf16 dense, 80 GB, 3.35 TB/s"),
    Accelerator("h200", 989.0, 141.0, 4.8, "NVIDIA H200 SXM datasheet (2024): 989 TFLOPS bf16 dense, 141 GB, 4.8 TB/s"),
    Accelerator("a100", 312.0, 80.0, 2.039, "NVIDIA A100 80GB SXM datasheet (2021): 312 TFLOPS bf16, 2.039 TB/s"),
)}
TRAIN_MFU = 0.35
"""Share of the peak a LoRA/full fine-tuning step reaches: 0.3-0.45 is what HF/DeepSpeed training of 7B models
typically reports on one H100; 0.35 is an assumption, not a measurement of this project."""
PREFILL_MFU = 0.5
"""Share of the peak for batched prompt processing (compute-bound, large matmuls): assumed."""
DECODE_EFF = 0.6
"""Share of the HBM bandwidth a batched decode step reaches (vLLM at moderate batch): assumed."""

# parameter counts (billions) of the models the configs name; local paths are read from their config.json
MODEL_PARAMS_B = {
    "meta-llama/Llama-2-7b-hf": 6.74, "meta-llama/Llama-2-7b-chat-hf": 6.74, "meta-llama/Meta-Llama-3-8B": 8.03,
    "meta-llama/Meta-Llama-3-8B-Instruct": 8.03, "meta-llama/Llama-Guard-3-8B": 8.03,
    "Qwen/Qwen2.5-7B": 7.62, "Qwen/Qwen2.5-7B-Instruct": 7.62, "google/gemma-2-9b": 9.24,
    "PKU-Alignment/beaver-dam-7b": 6.74, "cais/HarmBench-Llama-2-13b-cls": 13.0,
    "HuggingFaceTB/SmolLM2-135M-Instruct": 0.135, "smollm2-135m-instruct": 0.135, "gemma3-270m": 0.268,
}
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def params_from_config_json(path: Path) -> float:
    """Billions of parameters of a decoder from its HF config.json (Llama/Qwen/Mistral-style fields)."""
    c = json.loads(path.read_text())
    h, n_layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    inter = c.get("intermediate_size", 4 * h)
    heads = c.get("num_attention_heads", 1)
    kv = c.get("num_key_value_heads", heads)
    attn = h * h * 2 + 2 * h * (h // heads) * kv  # q, o + k, v (grouped-query)
    per_layer = attn + 3 * h * inter + 2 * h
    embed = vocab * h * (1 if c.get("tie_word_embeddings", False) else 2)
    return (n_layers * per_layer + embed + h) / 1e9


def model_params_b(name_or_path: str, field: str, tiny: dict | None = None) -> float:
    """Billions of parameters of `name_or_path` (the table, a local config.json, or the tiny toy model's config)."""
    if name_or_path == "tiny" and tiny is not None:
        h, n_layers, inter = tiny["hidden_size"], tiny["num_layers"], tiny["intermediate_size"]
        return (n_layers * (4 * h * h + 3 * h * inter) + 2 * 1024 * h) / 1e9  # the toy vocabulary is under 1,024
    if name_or_path in MODEL_PARAMS_B:
        return MODEL_PARAMS_B[name_or_path]
    local = Path(name_or_path) / "config.json"
    if local.is_file():
        return params_from_config_json(local)
    known = ", ".join(sorted(MODEL_PARAMS_B))
    raise ConfigError(field, name_or_path, f"has no known size: give a local directory with a config.json, or add "
                      f"it to hftlab/plan/costs.py MODEL_PARAMS_B (known: {known})")


def train_flops(params_b: float, tokens: float, *, lora: bool, checkpointing: bool, passes: float) -> float:
    per_token = (4.0 if lora else 6.0) + (2.0 if checkpointing else 0.0)
    return per_token * params_b * 1e9 * tokens * passes


def gpu_seconds(acc: Accelerator, *, train_flops: float = 0.0, prefill_tokens: float = 0.0, decode_tokens: float = 0.0,
                params_b: float = 0.0, dtype_bytes: int = 2, batch: int = 32) -> float:
    """Seconds on one `acc` for the given work (the module docstring's three formulas, summed)."""
    peak = acc.bf16_tflops * 1e12
    seconds = train_flops / (peak * TRAIN_MFU)
    seconds += 2.0 * params_b * 1e9 * prefill_tokens / (peak * PREFILL_MFU)
    if decode_tokens:
        per_step = params_b * 1e9 * dtype_bytes / (acc.bandwidth_tbs * 1e12 * DECODE_EFF)
        seconds += decode_tokens / max(batch, 1) * per_step
    return seconds


def memory_gb(params_b: float, dtype_bytes: int, *, lora: bool) -> float:
    """Weights, plus gradients and AdamW states (fp32 master, two moments) when every weight trains; activations and
    the KV cache come on top."""
    weights = params_b * dtype_bytes
    return weights if lora else weights + params_b * (dtype_bytes + 12)
