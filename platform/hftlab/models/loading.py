"""Load any causal LM by HF name or local path; LoRA through peft; save and reload trained stages.

The tiny toy-world model goes through exactly this code, like a 7B model would. A LoRA stage is
saved as its adapter plus the path of its parent model, and merged on load, so a chain
base -> aligned -> fine-tuned never stores a full copy of a large model per stage.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hftlab.config.errors import ConfigError
from hftlab.config.schema import LoraConfig
from hftlab.models import precision
from hftlab.models.stage_dir import is_lora_stage, mark_parent, parent_of
from hftlab.storage import atomic_dir


def device() -> torch.device:
    """The one accelerator if there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(name_or_path: str | Path, *, dtype: str = "float32", trust_remote_code: bool = False):
    """(model, tokenizer) from an HF name, a saved full model or a saved LoRA stage, on `device()`; `dtype` auto
    resolves to bf16 where the hardware has it (models/precision.py; a model that trains asks for its weights'
    dtype, precision.weights_for_training)."""
    dtype = precision.resolve(dtype)
    path = Path(name_or_path)
    if is_lora_stage(path):
        return _load_adapter_stage(path, dtype=dtype, trust_remote_code=trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=getattr(torch, dtype),
                                                     trust_remote_code=trust_remote_code)
    except ValueError as err:  # transformers' words run to several lines and never name our setting
        if trust_remote_code or "trust_remote_code" not in str(err):
            raise
        raise ConfigError("base.trust_remote_code", False, f"{name_or_path} ships its own model code, which runs only "
                          "with base.trust_remote_code=true: read that code, then set it if you trust it") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model.to(device())
    model.eval()
    return model, tokenizer


def _load_adapter_stage(path: Path, *, dtype: str, trust_remote_code: bool):
    from peft import PeftModel

    parent = parent_of(path)
    base, tokenizer = load_model(parent, dtype=dtype, trust_remote_code=trust_remote_code)
    model = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    model.requires_grad_(True)  # peft froze the base for the adapter; merged, it is a full model like any other
    model.eval()
    return model, tokenizer


def add_lora(model: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    """Wrap `model` with fresh LoRA adapters; only they train."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def for_training(model: torch.nn.Module, gradient_checkpointing: bool, every_n_layers: int = 1) -> torch.nn.Module:
    """Turn on activation recomputation if asked (HF's non-reentrant checkpointing: it keeps the RNG state, so dropout
    draws the same masks when a layer is recomputed, and needs no input that requires grad, which LoRA lacks).
    A training forward builds no KV cache (HF's default would, and a step never reads it); generation asks for one
    itself (generation/hf.py passes use_cache=True). `every_n_layers`: recompute one decoder layer in n (transformers'
    every_n_layers), the others keep their activations."""
    if gradient_checkpointing and hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False}, every_n_layers=every_n_layers)
    elif gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    return model


def save_stage(model: torch.nn.Module, tokenizer, out_dir: str | Path, parent: str | Path) -> Path:
    """Save atomically: a LoRA model as adapter + parent pointer, a fully tuned one as safetensors."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        mark_parent(tmp, parent)
    return out_dir
