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
