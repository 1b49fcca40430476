"""Group sampling for Group DRO: which alignment group (e.g. vulnerable / invulnerable) the next step trains on.

VAA trains on one group per step and moves the sampling distribution q toward the groups with the higher loss
(online mirror ascent, as in Sagawa et al.'s Group DRO), so the worst group gets more steps. The official
ChanLiang/VAA code does this for two groups with an importance-weighted loss and clips q to [0.1, 0.9]; this
class is the same rule for G groups.

Clipping, exactly: after the mirror-ascent update q is clamped elementwise to [q_min, q_max] ONCE and then
divided by its sum ONCE (no iteration). For two groups with q_min + q_max = 1 (the official 0.1 / 0.9) this is
exact: the result lies in the bounds and needs no renormalising. With more groups, or asymmetric bounds, the
renormalised q can land slightly outside [q_min, q_max] (e.g. [0.98, 0.01, 0.01] -> [0.818, 0.091, 0.091]);
the bounds are then a soft guard against a group starving, not a hard constraint.

Only the sampled group is updated, so the plain rule is biased toward groups that are sampled often (its fixed
point has q_i proportional to 1 / loss_i, the wrong way round); dividing the loss by q_g (importance_weighted,
the default, as in the official code) makes the expected update eta * loss_i for every group.

Loss scale: eta_q multiplies a loss, so its meaning depends on the model's loss values (a 1M-parameter toy model
and a 7B model sit at very different losses). `scale="mean"` divides each loss by a running mean of the losses seen
so far (an exponential average, decay `MEAN_DECAY`, started at the first loss), so f ~ 1 on average and eta_q is
the log-odds step per unit of relative loss, the same for any model.

Sampling uses a caller-supplied `torch.Generator`, so every distributed rank seeded alike draws the same group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

MODES = ("dro", "importance", "uniform")
SCALES = ("raw", "mean")
MEAN_DECAY = 0.9


class GroupSampler:
    """Distribution q over `num_groups` groups; "dro" updates it, "importance" and "uniform" keep it fixed.

    mode "dro": q starts uniform and `update` does mirror ascent on the sampled group.
    mode "importance": ablation, q is proportional to `group_sizes` (i.e. plain shuffling over the union) and never moves.
    mode "uniform": q is uniform and never moves (balanced group sampling, no DRO).
    Defaults (eta_q=0.01, importance_weighted=True, clip to [0.1, 0.9]) follow the official VAA code.
    """

    def __init__(
        self,
        num_groups: int,
        *,
        mode: str = "dro",
        eta_q: float = 0.01,
        importance_weighted: bool = True,
        q_min: float | None = 0.1,
        q_max: float | None = 0.9,
        group_sizes: Sequence[int] | None = None,
        scale: str = "raw",
    ) -> None:
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
        if q_min is not None and q_max is not None and q_min > q_max:
            raise ValueError(f"q_min {q_min} > q_max {q_max}")
        if q_min is not None and q_min * num_groups > 1 + 1e-12:
            raise ValueError(f"q_min {q_min} * {num_groups} groups exceeds 1: no distribution satisfies it")
        self.num_groups = num_groups
        self.mode = mode
        self.eta_q = float(eta_q)
        self.importance_weighted = importance_weighted
        self.q_min = q_min
        self.q_max = q_max
        self.group_sizes = [int(n) for n in group_sizes] if group_sizes is not None else None
        self.scale = scale
        self.loss_mean: float | None = None
        self.q = self._initial_q()

    def _initial_q(self) -> torch.Tensor:
        """Uniform, or proportional to the group sizes in "importance" mode (float64 on CPU: exact enough to resume)."""
        if self.mode == "importance":
            if self.group_sizes is None or len(self.group_sizes) != self.num_groups or min(self.group_sizes) < 0:
                raise ValueError("mode 'importance' needs group_sizes: one non-negative count per group")
            sizes = torch.tensor(self.group_sizes, dtype=torch.float64)
            if sizes.sum() <= 0:
                raise ValueError("mode 'importance' needs at least one non-empty group")
            return sizes / sizes.sum()
        return torch.full((self.num_groups,), 1.0 / self.num_groups, dtype=torch.float64)

    def probs(self) -> list[float]:
        """The current q as plain floats (for logging)."""
        return [float(x) for x in self.q]

    def sample(self, generator: torch.Generator) -> int:
        """Draw one group index from q; the generator (CPU) alone decides, so equal seeds give equal draws."""
        return int(torch.multinomial(self.q, 1, generator=generator).item())

    def update(self, group: int, loss: float) -> None:
        """Mirror ascent on the sampled group: q_g <- q_g * exp(eta_q * f), then normalise and clip.

        f = loss, or loss / q_g (the unbiased estimate of the group's loss contribution when it was sampled with
        probability q_g) when importance_weighted. No-op outside "dro" mode. The exponent is shifted by a constant
        before exponentiating, which cancels in the normalisation and keeps large losses from overflowing.
        """
        if self.mode != "dro":
            return
        if not 0 <= group < self.num_groups:
            raise IndexError(f"group {group} out of range for {self.num_groups} groups")
        if not math.isfinite(loss):
            raise ValueError(f"non-finite loss {loss} for group {group}")
        if self.scale == "mean":
            self.loss_mean = loss if self.loss_mean is None else MEAN_DECAY * self.loss_mean + (1 - MEAN_DECAY) * loss
            loss = loss / max(self.loss_mean, 1e-12)
        f = loss / float(self.q[group]) if self.importance_weighted else loss
        log_q = self.q.log()
        log_q[group] += self.eta_q * f
        q = torch.softmax(log_q, dim=0)  # = q * exp(eta f e_g) / Z, computed stably
        self.q = self._clip(q)

    def _clip(self, q: torch.Tensor) -> torch.Tensor:
        """Clamp to [q_min, q_max] once, then divide by the sum once (see the module docstring for what that implies)."""
        if self.q_min is None and self.q_max is None:
            return q
        q = q.clamp(min=self.q_min, max=self.q_max)
        return q / q.sum()

    def state_dict(self) -> dict[str, Any]:
        """q and every setting, so `load_state_dict` on a fresh sampler resumes exactly."""
        return {
            "q": self.q.clone(),
            "num_groups": self.num_groups,
            "mode": self.mode,
            "eta_q": self.eta_q,
            "importance_weighted": self.importance_weighted,
            "q_min": self.q_min,
            "q_max": self.q_max,
            "group_sizes": list(self.group_sizes) if self.group_sizes is not None else None,
            "scale": self.scale,
            "loss_mean": self.loss_mean,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore q and the settings saved by `state_dict` (the caller restores its generator's state itself)."""
        q = torch.as_tensor(state["q"], dtype=torch.float64).clone()
        if q.shape != (int(state["num_groups"]),):
            raise ValueError(f"q has shape {tuple(q.shape)}, expected ({state['num_groups']},)")
        self.num_groups = int(state["num_groups"])
        self.mode = state["mode"]
        self.eta_q = float(state["eta_q"])
        self.importance_weighted = bool(state["importance_weighted"])
        self.q_min = state["q_min"]
        self.q_max = state["q_max"]
        self.group_sizes = list(state["group_sizes"]) if state["group_sizes"] is not None else None
        self.scale = state.get("scale", "raw")
        self.loss_mean = state.get("loss_mean")
        self.q = q
