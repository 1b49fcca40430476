"""Per-method settings: one small dataclass per algorithm in algorithms/."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hftlab.config.errors import check

GROUPINGS = ("true", "one", "noisy", "vulnerable_only", "invulnerable_only", "random")


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
    update_on_perturbed: bool = True
    """On a perturbed step, update q with the perturbed loss (the official code, ChanLiang/VAA trainer.py:L794-L795
    @ e00cbf4); false: always with the loss at theta (the clean loss, as on plain steps)."""

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
    """Vaccine: align under a worst-case perturbation of the attention outputs (algorithms/vaccine.py)."""

    rho: float = 2.0
    """Radius of the hidden-state perturbation: eps_l = rho * g_l / (||g|| + 1e-7), ||g|| over all hooked modules and
    tokens of the batch (git-disl/Vaccine train.py:L253 default 2; 0 = plain SFT)."""
    layers: Literal["attention", "decoder"] = "attention"
    """Which outputs are perturbed: attention = every self-attention module's output (the official code,
    Vaccine trainer.py:L36-L50); decoder = every decoder layer's output (the residual stream)."""

    def __post_init__(self) -> None:
        check(self.rho >= 0, "rho", self.rho, "must be >= 0")
        check(self.layers in ("attention", "decoder"), "layers", self.layers, "must be attention or decoder")


@dataclass
class BoosterConfig:
    """Booster: L_align + lam * (L_harm(theta) - L_harm(theta - alpha g_h / ||g_h||)) (algorithms/booster.py)."""

    lam: float = 5.0
    """Weight of the harmful-loss-drop regulariser (git-disl/Booster script/alignment/smooth_align.sh:L14: 5;
    0 = plain SFT)."""
    alpha: float = 0.1
    """Length of the normalised harmful step the regulariser simulates (smooth_align.sh:L15: 0.1)."""
    harmful_batch_size: int | None = None
    """Harmful examples per step (null: the stage's batch_size; the official code hard-codes 10, its script's
    alignment batch size: Booster trainer.py:L149)."""

    def __post_init__(self) -> None:
        check(self.lam >= 0, "lam", self.lam, "must be >= 0")
        check(self.alpha >= 0, "alpha", self.alpha, "must be >= 0")
        check(self.harmful_batch_size is None or self.harmful_batch_size >= 1, "harmful_batch_size",
              self.harmful_batch_size, "must be >= 1")


@dataclass
class RepNoiseConfig:
    """RepNoise: L_harmless + beta * MMD(MLP outputs, noise) - alpha * log(L_lens + 1) (algorithms/repnoise.py)."""

    alpha: float = 1.0
    """Weight of the bounded ascent -log(L_lens + 1) on the harmful answers (representation-noising loss.py:L76,
    L129: alpha = 1)."""
    beta: float = 0.001
    """Weight of the noise term, the MMD of every layer's MLP output to Gaussian noise (loss.py:L76, L129: 0.001)."""
    mask: Literal["response", "differ"] = "response"
    """Tokens the three terms see. response: the answer tokens (ours; the harmful batches are unpaired); differ: the
    positions where the harmful and harmless ids differ (the reference, loss.py:L93), with its masked cross-entropy."""
    paired: bool = False
    """Harmful row i answers alignment row i's prompt (the reference's paired data; alignment rows whose prompt has
    no harmful answer are paired with themselves, so with mask=differ they take no part). false: a shuffled stream
    of the harmful pool, as the Booster and VAA repositories' RepNoise trainers draw it."""

    def __post_init__(self) -> None:
        check(self.alpha >= 0, "alpha", self.alpha, "must be >= 0")
        check(self.beta >= 0, "beta", self.beta, "must be >= 0")
        check(self.mask in ("response", "differ"), "mask", self.mask, "must be response or differ")


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
    cache_reference: bool = True
    """With align_loss=kl: compute the aligned model's log-probabilities of the (fixed) alignment answers once, at
    the start, and reuse them (memory: answer tokens x vocabulary floats); false: a reference forward per probe."""

    def __post_init__(self) -> None:
        check(self.align_loss in ("kl", "ce"), "align_loss", self.align_loss, "must be kl or ce")
        check(self.mode in ("global", "per_tensor"), "mode", self.mode, "must be global or per_tensor")
        check(self.rho >= 0, "rho", self.rho, "must be >= 0")
        check(self.cadence >= 1, "cadence", self.cadence, "must be >= 1")
        check(self.n_alignment >= 1, "n_alignment", self.n_alignment, "must be >= 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")


@dataclass
class LisaConfig:
    """Lisa: fine-tuning that alternates alignment and user-data phases, each with a proximal term toward the other
    phase's last weights (algorithms/lisa.py)."""

    rho: float = 1.0
    """Weight of the proximal term rho / 2 * ||theta - theta_other||^2 (git-disl/Lisa
    script/finetune/lisa_poison_ratio.sh:L17-L23: RHO=1; its train.py default is 0.1)."""
    alignment_steps: int = 100
    """Optimizer steps of each alignment phase (lisa_poison_ratio.sh: align_step=100)."""
    finetune_steps: int = 900
    """Optimizer steps of each user-data phase (lisa_poison_ratio.sh: finetune_step=900)."""
    n_alignment: int | None = None
    """Alignment pairs the service holds (the first n of the alignment set; null: all of it, as Lisa's
    guide_data_num=10000 covers its whole BeaverTails_safe set)."""
    proximal_after: float = 0.1
    """No proximal term during this share of the stage's steps (Lisa trainer.py:L182-L183, L188: 10%)."""

    def __post_init__(self) -> None:
        check(self.rho >= 0, "rho", self.rho, "must be >= 0")
        check(self.alignment_steps >= 0, "alignment_steps", self.alignment_steps, "must be >= 0")
        check(self.finetune_steps >= 1, "finetune_steps", self.finetune_steps, "must be >= 1")
        check(self.n_alignment is None or self.n_alignment >= 1, "n_alignment", self.n_alignment, "must be >= 1")
        check(0.0 <= self.proximal_after <= 1.0, "proximal_after", self.proximal_after, "must be in [0, 1]")
