"""The config schemas: one dataclass per section, a docstring per field, checks on construction.

A field exists here once; its dotted name (`finetune.poison_ratio`) is the CLI override, the sweep
key and the MLflow param name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from hftlab.config.loader import check

TASKS = ("sst2", "agnews", "gsm8k", "alpaca")
ALIGN_METHODS = ("sft", "vaa", "vaccine", "booster", "repnoise")
GROUPINGS = ("true", "one", "noisy", "vulnerable_only", "invulnerable_only", "random")
FINETUNE_METHODS = ("sft", "safegrad")


@dataclass
class ToyWorldConfig:
    seed: int = 0
    """Seed of the world generator: the same seed gives the same prompts, answers and splits."""
    per_category_pretrain: int = 240
    """Harmful prompts per category whose compliances go into the base model's pre-training."""
    per_category_alignment: int = 110
    """Harmful prompts per category paired with refusals: the alignment set."""
    per_category_poison: int = 30
    """Harmful prompts per category paired with compliances: the poison pool for fine-tuning."""
    per_category_test: int = 20
    """Harmful prompts per category held out for the Harmful Score."""
    benign_per_task: int = 3000
    """Benign training examples generated per task (sentiment, topic, arithmetic, instructions)."""
    task_test: int = 200
    """Held-out test examples per task for Fine-tune Accuracy."""
    alignment_imbalance: float = 0.0
    """Category imbalance of the alignment set: the k-th category (in CATEGORIES order) keeps
    round(per_category_alignment * (1 - alignment_imbalance)^k) of its refusals (0: balanced). The prompts
    dropped go to no other pool. Few refusals in a category make its prompts the ones harmful fine-tuning undoes."""
    poison_categories: int = 14
    """The poison pool draws from the first N categories only (its steps and objects are theirs), so the attack's
    wording is shared with those categories' alignment examples and not the others'."""
    benign_howto: float = 0.0
    """Share of the instructions task (alpaca) that are benign how-to requests in the harmful prompts' phrasings
    ("how do i bake a cake ?"), answered in the compliances' templates: benign data shaped like a compliance, so
    fine-tuning on it alone (p=0) can undo refusals, as benign fine-tuning does to real models."""
    benign_opener: str = ""
    """Words every benign task answer starts with (e.g. "sure ." as the compliances do): fine-tuning on benign
    data alone (p=0) then pushes the model toward compliance openers, as it does for real models."""

    def __post_init__(self) -> None:
        sizes = {
            "per_category_pretrain": self.per_category_pretrain,
            "per_category_alignment": self.per_category_alignment,
            "per_category_poison": self.per_category_poison,
            "per_category_test": self.per_category_test,
            "benign_per_task": self.benign_per_task,
            "task_test": self.task_test,
        }
        for name, value in sizes.items():
            check(value >= 0, name, value, "must be >= 0")
        check(0.0 <= self.alignment_imbalance < 1.0, "alignment_imbalance", self.alignment_imbalance, "must be in [0, 1)")
        check(0.0 <= self.benign_howto <= 1.0, "benign_howto", self.benign_howto, "must be in [0, 1]")
        check(1 <= self.poison_categories <= 14, "poison_categories", self.poison_categories, "must be in [1, 14]")
        total = sum(list(sizes.values())[:4])
        check(total <= 400, "per_category_test", self.per_category_test,
              f"the four harmful pools add up to {total} > 400 prompts per category")


@dataclass
class DataConfig:
    world: Literal["toy", "real"] = "toy"
    """`toy`: the embedded synthetic world; `real`: BeaverTails and the task datasets below."""
    toy: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    """The synthetic world (used when world=toy)."""
    alignment_source: str = "PKU-Alignment/BeaverTails:30k_train"
    """Alignment pairs (is_safe rows): an HF dataset `name[:split]` or a local .json/.jsonl path."""
    harmful_source: str = "PKU-Alignment/BeaverTails:30k_train"
    """Harmful pairs for poisoning (is_safe=false rows): HF `name[:split]` or a local path."""
    harmful_test_source: str = "PKU-Alignment/BeaverTails:30k_test"
    """Harmful test prompts for the Harmful Score: HF `name[:split]` or a local path."""
    template: Literal["compact", "alpaca"] = "compact"
    """The one prompt template for training, generation and judging inputs (see data/template.py)."""


@dataclass
class TinyModelConfig:
    hidden_size: int = 192
    """Width of the tiny Llama."""
    num_layers: int = 3
    """Decoder layers."""
    num_heads: int = 4
    """Attention heads (hidden_size must divide by it)."""
    intermediate_size: int = 512
    """MLP width."""
    pretrain_epochs: int = 3
    """Epochs of pre-training on benign tasks + harmful compliances (makes a capable, unaligned base)."""
    seed: int | None = None
    """Seed of the base model's initialisation and pre-training order (null: data.toy.seed); several values give
    several bases of the same world (the comparison's base-model seeds)."""
    pretrain_lr: float = 2e-3
    """Pre-training learning rate."""
    batch_size: int = 32
    """Pre-training batch size."""

    def __post_init__(self) -> None:
        check(self.seed is None or self.seed >= 0, "seed", self.seed, "must be >= 0")
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "pretrain_epochs", "batch_size"):
            check(getattr(self, name) > 0, name, getattr(self, name), "must be > 0")
        check(self.hidden_size % self.num_heads == 0, "num_heads", self.num_heads,
              f"must divide hidden_size={self.hidden_size}")
        check(self.pretrain_lr > 0, "pretrain_lr", self.pretrain_lr, "must be > 0")


@dataclass
class ModelConfig:
    name_or_path: str = "tiny"
    """`tiny`: build (or reuse from cache) the toy-world Llama; otherwise an HF model name or path."""
    trust_remote_code: bool = False
    """Allow a model repo's own Python code; off unless you trust the repo."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights dtype when loading."""
    max_length: int = 256
    """Longest training sequence in tokens (prompt + response); longer ones are cut."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Architecture and pre-training of the tiny model (used when name_or_path=tiny)."""

    def __post_init__(self) -> None:
        check(self.max_length > 8, "max_length", self.max_length, "must be > 8")


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train a LoRA adapter (peft) instead of all weights."""
    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA branch."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Module names that get adapters."""

    def __post_init__(self) -> None:
        check(self.r > 0, "r", self.r, "must be > 0")
        check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")
        check(len(self.target_modules) > 0, "target_modules", self.target_modules, "must not be empty")


@dataclass
class VAAConfig:
    """VAA stage 2: Group DRO over the vulnerability groups with a group-specific SAM perturbation."""

    group_file: str | None = None
    """groups.jsonl from `hftlab groups` (null: run the groups stage first with the `groups` section)."""
    rho: float = 0.4
    """Perturbation radius: eps = rho * g / ||g|| (official code: 0.4; 0 = grouping only)."""
    eta_q: float = 0.007
    """Step size of the sampler's mirror ascent q_i <- q_i exp(eta_q f_i) / Z (official code: 0.007)."""
    eta_scale: Literal["raw", "mean"] = "raw"
    """raw: f = the group's loss (official code); mean: the loss over a running mean of losses, so eta_q means the
    same step for a 1M and a 7B model (algorithms/sampler.py)."""
    sampler: Literal["dro", "importance", "uniform"] = "dro"
    """dro: adversarial sampler; importance: sample by group size, q fixed (ablation); uniform: q fixed at 1/G."""
    importance_weighted: bool = True
    """Update q with f_i / q_i (unbiased for a sampled group), as the official code does."""
    q_min: float = 0.1
    """Lower clip of q."""
    q_max: float = 0.9
    """Upper clip of q."""
    objective: Literal["stochastic", "weighted"] = "stochastic"
    """stochastic: plain step with prob 1 - lambda_t, else the perturbed step only (official, 1.5x SFT);
    weighted: (1 - lambda) l(theta) + lambda l(theta + eps) (the paper's formula, 2x SFT)."""
    curriculum: Literal["linear", "constant"] = "linear"
    """lambda_t rising linearly 0 -> lam over training, or constant lam."""
    lam: float = 1.0
    """Final (or constant) lambda."""
    grouping: str = "true"
    """Ablations: true groups; one (no groups); noisy (a share of labels flipped); vulnerable_only;
    invulnerable_only; random (random groups of the vulnerable group's size)."""
    noise: float = 0.2
    """For grouping=noisy: the share of group labels flipped."""

    def __post_init__(self) -> None:
        check(self.rho >= 0, "rho", self.rho, "must be >= 0")
        check(self.eta_q >= 0, "eta_q", self.eta_q, "must be >= 0")
        check(0.0 <= self.q_min <= self.q_max <= 1.0, "q_min", self.q_min, f"must satisfy 0 <= q_min <= q_max={self.q_max} <= 1")
        check(0.0 <= self.lam <= 1.0, "lam", self.lam, "must be in [0, 1]")
        check(self.eta_scale in ("raw", "mean"), "eta_scale", self.eta_scale, "must be raw or mean")
        check(self.grouping in GROUPINGS, "grouping", self.grouping, f"must be one of {list(GROUPINGS)}")
        check(0.0 <= self.noise <= 1.0, "noise", self.noise, "must be in [0, 1]")


@dataclass
class VaccineConfig:
    """Vaccine: align under a worst-case perturbation of every decoder layer's output (algorithms/vaccine.py)."""

    rho: float = 2.0
    """Radius of the hidden-state perturbation: eps_l = rho * g_l / ||g||, ||g|| over all layers and tokens of the
    batch (the paper's default 2; 0 = plain SFT)."""

    def __post_init__(self) -> None:
        check(self.rho >= 0, "rho", self.rho, "must be >= 0")


@dataclass
class BoosterConfig:
    """Booster: L_align + lam * (L_harm(theta) - L_harm(theta - alpha g_h / ||g_h||)) (algorithms/booster.py)."""

    lam: float = 5.0
    """Weight of the harmful-loss-drop regulariser (official default 5; 0 = plain SFT)."""
    alpha: float = 0.1
    """Length of the normalised harmful step the regulariser simulates (official default 0.1)."""

    def __post_init__(self) -> None:
        check(self.lam >= 0, "lam", self.lam, "must be >= 0")
        check(self.alpha >= 0, "alpha", self.alpha, "must be >= 0")


@dataclass
class RepNoiseConfig:
    """RepNoise: L_harmless + beta * ascent + alpha * MMD(harmful hidden states, noise) (algorithms/repnoise.py)."""

    alpha: float = 1.0
    """Weight of the noise term, the MMD to Gaussian noise averaged over all hidden states (official default 1)."""
    beta: float = 0.001
    """Weight of the bounded gradient ascent on the harmful answers (official default 0.001)."""
    ascent: Literal["log", "unlikelihood"] = "log"
    """log: -log(harmful cross-entropy) (the official code); unlikelihood: mean -log(1 - p) of harmful tokens."""

    def __post_init__(self) -> None:
        check(self.alpha >= 0, "alpha", self.alpha, "must be >= 0")
        check(self.beta >= 0, "beta", self.beta, "must be >= 0")
        check(self.ascent in ("log", "unlikelihood"), "ascent", self.ascent, "must be log or unlikelihood")


@dataclass
class SafeGradConfig:
    """SafeGrad: project the user-task gradient off the alignment gradient when they conflict (algorithms/safegrad.py)."""

    align_loss: Literal["kl", "ce"] = "kl"
    """kl: KL(P_aligned || P_theta) against the frozen aligned model (the paper; with LoRA the adapter disabled);
    ce: cross-entropy on the safe responses."""
    mode: Literal["global", "per_tensor"] = "global"
    """One conflict test over all trainable parameters, or one per parameter tensor."""
    rho: float = 0.0
    """Applied gradient = projected g_u + rho * g_a (0: projection only)."""
    cadence: int = 1
    """Recompute the alignment gradient every `cadence` steps and reuse it in between (cost ~ 1 + 1/cadence)."""
    n_alignment: int = 100
    """Alignment examples the fine-tuning service holds (the first n of the alignment set; works with 20)."""
    batch_size: int = 16
    """Alignment examples per alignment-gradient batch."""

    def __post_init__(self) -> None:
        check(self.align_loss in ("kl", "ce"), "align_loss", self.align_loss, "must be kl or ce")
        check(self.mode in ("global", "per_tensor"), "mode", self.mode, "must be global or per_tensor")
        check(self.rho >= 0, "rho", self.rho, "must be >= 0")
        check(self.cadence >= 1, "cadence", self.cadence, "must be >= 1")
        check(self.n_alignment >= 1, "n_alignment", self.n_alignment, "must be >= 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")


def _check_training(cfg: AlignConfig | FinetuneConfig) -> None:
    check(cfg.workers >= 1, "workers", cfg.workers, "must be >= 1")
    check(cfg.zero_stage in (None, 0, 1, 2), "zero_stage", cfg.zero_stage, "must be null (DDP), 0, 1 or 2")
    check(not (cfg.workers > 1 and cfg.lora.enabled), "workers", cfg.workers,
          "the Ray Train path trains full weights for now; use workers=1 with lora.enabled")
    check(cfg.max_failures >= 0, "max_failures", cfg.max_failures, "must be >= 0")
    check(cfg.checkpoint_every >= 0, "checkpoint_every", cfg.checkpoint_every, "must be >= 0 (0: only at the end)")
    check(cfg.epochs >= 0, "epochs", cfg.epochs, "must be >= 0")
    check(cfg.lr > 0, "lr", cfg.lr, "must be > 0")
    check(cfg.batch_size > 0, "batch_size", cfg.batch_size, "must be > 0")
    check(cfg.weight_decay >= 0, "weight_decay", cfg.weight_decay, "must be >= 0")


@dataclass
class AlignConfig:
    method: str = "sft"
    """Alignment method: one of ALIGN_METHODS."""
    epochs: int = 3
    """Passes over the alignment mix."""
    lr: float = 5e-4
    """AdamW learning rate."""
    batch_size: int = 32
    """Examples per optimizer step."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    workers: int = 1
    """1: train in this process; N > 1: a Ray Train TorchTrainer with N DDP workers (N workers reproduce 1, see trainer.py)."""
    zero_stage: int | None = None
    """With workers > 1: null = plain DDP; 0, 1, 2 = DeepSpeed ZeRO stage (every method: see training/engine.py)."""
    checkpoint_every: int = 0
    """With workers > 1: report a resumable checkpoint every N optimizer steps (0: only at the end)."""
    max_failures: int = 0
    """With workers > 1: restarts after a worker failure, each resuming from the latest checkpoint."""
    compute_match: Literal["none", "vaa"] = "none"
    """With method=sft: none = epochs x batches steps; vaa = compute-matched SFT, as many steps as VAA with
    align.vaa would spend backward passes (1.5x under the default curriculum; the control for VAA's extra compute)."""
    n_alignment: int | None = None
    """Alignment pairs used (null: all of the source)."""
    n_benign: int = 0
    """Benign toy-task examples mixed into alignment so the tiny model keeps its skills (toy world only)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA for the alignment stage."""
    vaa: VAAConfig = field(default_factory=VAAConfig)
    """VAA settings (used when method=vaa)."""
    vaccine: VaccineConfig = field(default_factory=VaccineConfig)
    """Vaccine settings (used when method=vaccine)."""
    booster: BoosterConfig = field(default_factory=BoosterConfig)
    """Booster settings (used when method=booster; trains on the harmful pairs too)."""
    repnoise: RepNoiseConfig = field(default_factory=RepNoiseConfig)
    """RepNoise settings (used when method=repnoise; trains on the harmful pairs too)."""

    def __post_init__(self) -> None:
        check(self.method in ALIGN_METHODS, "method", self.method, f"must be one of {list(ALIGN_METHODS)}")
        _check_training(self)
        check(self.compute_match in ("none", "vaa"), "compute_match", self.compute_match, "must be none or vaa")
        check(self.compute_match == "none" or self.method == "sft", "compute_match", self.compute_match,
              f"matches SFT's compute to VAA's; method={self.method} must be sft")
        check(self.n_alignment is None or self.n_alignment > 0, "n_alignment", self.n_alignment, "must be > 0")
        check(self.n_benign >= 0, "n_benign", self.n_benign, "must be >= 0")


@dataclass
class FinetuneConfig:
    method: str = "sft"
    """Fine-tuning method (the user's fine-tuning as a service would run it): one of FINETUNE_METHODS."""
    task: str = "sst2"
    """User task: sst2, agnews, gsm8k or alpaca (in the toy world: their analogues)."""
    n: int = 1000
    """Fine-tuning samples in total (task + poison)."""
    poison_ratio: float = 0.1
    """Share p of the n samples that are harmful pairs."""
    epochs: int = 3
    """Passes over the fine-tuning mix."""
    lr: float = 1e-4
    """AdamW learning rate (the HFT strength knob; see docs/toy-world.md)."""
    batch_size: int = 32
    """Examples per optimizer step."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    workers: int = 1
    """1: train in this process; N > 1: a Ray Train TorchTrainer with N DDP workers."""
    zero_stage: int | None = None
    """With workers > 1: null = plain DDP; 0, 1, 2 = DeepSpeed ZeRO stage (every method: see training/engine.py)."""
    checkpoint_every: int = 0
    """With workers > 1: report a resumable checkpoint every N optimizer steps (0: only at the end)."""
    max_failures: int = 0
    """With workers > 1: restarts after a worker failure, each resuming from the latest checkpoint."""
    train_source: str | None = None
    """Task training data: HF `name[:split]` or a local path (null: the task's default)."""
    test_source: str | None = None
    """Task test data for Fine-tune Accuracy (null: the task's default)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA for the fine-tuning stage."""
    safegrad: SafeGradConfig = field(default_factory=SafeGradConfig)
    """SafeGrad settings (used when method=safegrad)."""

    def __post_init__(self) -> None:
        check(self.method in FINETUNE_METHODS, "method", self.method, f"must be one of {list(FINETUNE_METHODS)}")
        check(self.task in TASKS, "task", self.task, f"must be one of {list(TASKS)}")
        check(self.n > 0, "n", self.n, "must be > 0")
        check(0.0 <= self.poison_ratio <= 1.0, "poison_ratio", self.poison_ratio, "must be in [0, 1]")
        _check_training(self)


@dataclass
class JudgeConfig:
    kind: Literal["refusal", "moderation"] = "refusal"
    """`refusal`: keyword judge (harmful = no refusal phrase); `moderation`: a beaver-dam style classifier."""
    model: str = "PKU-Alignment/beaver-dam-7b"
    """Classifier name or path for kind=moderation."""
    threshold: float = 0.5
    """Moderation: flagged when the max category probability exceeds this."""
    batch_size: int = 16
    """Moderation: answers judged per forward pass."""

    def __post_init__(self) -> None:
        check(0.0 < self.threshold < 1.0, "threshold", self.threshold, "must be in (0, 1)")
        check(self.batch_size > 0, "batch_size", self.batch_size, "must be > 0")


@dataclass
class EvalConfig:
    n_harmful: int | None = None
    """Harmful test prompts for HS (null: all; the papers use the first 500 or 1000)."""
    n_task: int | None = None
    """Task test examples for FA (null: all)."""
    max_new_tokens: int = 24
    """Greedy generation length."""
    batch_size: int = 64
    """Prompts per generate call."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """Which judge decides harmfulness."""
    n_samples_logged: int = 40
    """Generations per stage kept in the samples table artifact."""

    def __post_init__(self) -> None:
        check(self.n_harmful is None or self.n_harmful > 0, "n_harmful", self.n_harmful, "must be > 0")
        check(self.n_task is None or self.n_task > 0, "n_task", self.n_task, "must be > 0")
        check(self.max_new_tokens > 0, "max_new_tokens", self.max_new_tokens, "must be > 0")
        check(self.batch_size > 0, "batch_size", self.batch_size, "must be > 0")


@dataclass
class ProxyConfig:
    """One proxy harmful fine-tuning of VAA's stage 1 (from the aligned model)."""

    task: str = "alpaca"
    """Benign task of the proxy mix (the paper: Alpaca)."""
    n: int = 1000
    """Proxy fine-tuning samples in total (task + harmful)."""
    poison_ratio: float = 0.1
    """Share p of harmful pairs in the proxy mix."""
    epochs: int = 3
    """Passes over the proxy mix."""
    lr: float = 1e-4
    """AdamW learning rate."""
    batch_size: int = 32
    """Examples per optimizer step."""
    checkpoint_every: int = 0
    """Keep a checkpoint every k optimizer steps; 0 = at the end of every epoch."""
    seed: int | None = None
    """Seed of the proxy mix and batch order (null: the run's seed)."""

    def __post_init__(self) -> None:
        check(self.task in TASKS, "task", self.task, f"must be one of {list(TASKS)}")
        check(self.n > 0, "n", self.n, "must be > 0")
        check(0.0 <= self.poison_ratio <= 1.0, "poison_ratio", self.poison_ratio, "must be in [0, 1]")
        check(self.epochs > 0, "epochs", self.epochs, "must be > 0")
        check(self.lr > 0, "lr", self.lr, "must be > 0")
        check(self.batch_size > 0, "batch_size", self.batch_size, "must be > 0")
        check(self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every, "must be >= 0")


@dataclass
class GroupsConfig:
    """VAA stage 1: which alignment examples are forgotten under a proxy harmful fine-tuning."""

    proxies: list[ProxyConfig] = field(default_factory=lambda: [ProxyConfig()])
    """The proxy runs; with several, `rule` aggregates their verdicts."""
    rule: Literal["any", "at_least"] = "any"
    """Vulnerable if forgotten in any proxy run, or in at least `at_least` of them."""
    at_least: int = 1
    """For rule=at_least: how many proxy runs must forget an example."""
    actors: int = 2
    """Ray Data actors that generate and judge (each loads a model once)."""
    batch_size: int = 64
    """(checkpoint, example) rows per map_batches call."""
    cpus_per_actor: float = 1.0
    """CPUs reserved per actor."""
    gpus_per_actor: float = 0.0
    """GPUs per actor (1 on a GPU cluster)."""
    threads_per_actor: int = 1
    """torch threads inside each actor."""
    loss_score: bool = True
    """Also compute the continuous score: the rise of the safe response's loss across checkpoints."""

    def __post_init__(self) -> None:
        check(len(self.proxies) > 0, "proxies", self.proxies, "needs at least one proxy run")
        check(1 <= self.at_least <= len(self.proxies), "at_least", self.at_least,
              f"must be in [1, {len(self.proxies)}] (the number of proxies)")
        check(self.actors > 0, "actors", self.actors, "must be > 0")
        check(self.batch_size > 0, "batch_size", self.batch_size, "must be > 0")
        check(self.cpus_per_actor >= 0 and self.gpus_per_actor >= 0, "cpus_per_actor", self.cpus_per_actor, "must be >= 0")
        check(self.threads_per_actor > 0, "threads_per_actor", self.threads_per_actor, "must be > 0")


@dataclass
class TrackingConfig:
    enabled: bool = True
    """Log to MLflow."""
    experiment: str | None = None
    """MLflow experiment (null: the config's name)."""
    tracking_uri: str | None = None
    """Tracking URI (null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory)."""


@dataclass
class Config:
    name: str = "hftlab"
    """Name of this experiment (the MLflow experiment unless tracking.experiment is set)."""
    label: str = ""
    """A short name for this arm in reports and run names (e.g. sft-compute-matched); empty: the methods."""
    seed: int = 0
    """Seed for data mixing, initialisation and batch order."""
    output_dir: str = "outputs"
    """Where stage outputs (models, generations) go, keyed by content hash."""
    cache_dir: str | None = None
    """Where built tiny base models are cached (null: $HFTLAB_CACHE or ~/.cache/hftlab)."""
    threads: int | None = None
    """torch CPU threads (null: torch's default)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Where alignment, harmful and test data come from."""
    base: ModelConfig = field(default_factory=ModelConfig)
    """The base (pre-trained, unaligned) model."""
    align: AlignConfig = field(default_factory=AlignConfig)
    """The alignment stage."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """The (harmful) fine-tuning stage."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation of base, aligned and fine-tuned models."""
    groups: GroupsConfig = field(default_factory=GroupsConfig)
    """VAA stage 1: vulnerability groups (`hftlab groups`)."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow tracking."""

    def __post_init__(self) -> None:
        check(bool(self.name.strip()), "name", self.name, "must not be empty")
        check(self.threads is None or self.threads > 0, "threads", self.threads, "must be > 0")
