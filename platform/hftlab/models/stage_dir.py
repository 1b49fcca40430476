"""What a stage directory holds, without torch: a full model (config.json + safetensors) or a LoRA stage (a peft
adapter + hftlab_parent.json naming the model it adapts). Read by loading, serving (vLLM), the Ray Train workers and
the stage cache alike, so the layout is spelled once."""

from __future__ import annotations

import json
from pathlib import Path

PARENT_FILE = "hftlab_parent.json"
ADAPTER_CONFIG = "adapter_config.json"


def is_lora_stage(path: str | Path) -> bool:
    """A LoRA stage directory (adapter + hftlab_parent.json), not a full model."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def is_model_dir(path: str | Path) -> bool:
    """A finished stage or model directory: a full model's config or a LoRA stage's adapter."""
    return (Path(path) / "config.json").is_file() or is_lora_stage(path)


def parent_of(path: str | Path) -> str:
    """The model a LoRA stage adapts."""
    return json.loads((Path(path) / PARENT_FILE).read_text())["parent"]


def mark_parent(path: str | Path, parent: str | Path) -> None:
    """Beside a saved adapter, name the model it adapts (nothing to do for a full model)."""
    if is_lora_stage(path):
        (Path(path) / PARENT_FILE).write_text(json.dumps({"parent": str(parent)}))


def adapter_rank(path: str | Path) -> int:
    """A LoRA stage's rank r."""
    return int(json.loads((Path(path) / ADAPTER_CONFIG).read_text())["r"])
