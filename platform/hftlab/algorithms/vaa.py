"""VAA (Vulnerability-Aware Alignment): Group DRO over alignment groups plus a group-specific SAM perturbation.

Each step: the sampler draws a group g from q, the step trains on one batch of g, and q moves toward groups with
higher loss. The perturbation makes the update robust to a small worst-case weight change, lambda (curriculum)
decides how much of the step is perturbed. Two objective forms:

- "stochastic" (the official code, `DROSamplingTrainer.training_step`, ChanLiang/VAA trainer.py:L719-L807 @ e00cbf4):
  with probability 1 - lambda_t a plain SFT step on the batch (L759-L772); otherwise the gradient at theta gives
  eps = rho * g / ||g||, the loss is recomputed at theta + eps, theta is restored and the optimizer steps with the
  perturbed gradient only (L774-L805). The sampler is then updated with the perturbed loss (L794-L795; clean loss
  on plain steps, L761-L762): `update_on_perturbed=True`, the default. One backward on plain steps, two on
  perturbed ones: about 1.5x SFT on average under a linear 0 -> 1 curriculum. Difference: the reference divides
  by ||g|| + 1e-7 (L777); ours by ||g|| (a zero gradient gives eps = 0), equal in float32 whenever ||g|| >= 2.
- "weighted" (the paper's objective): (1 - lambda) l(theta) + lambda l(theta + eps), i.e. the gradients of both
  terms summed with those weights. Two backwards whenever lambda > 0.

rho = 0 means no perturbation at all (l(theta + 0) = l(theta)): every step is a plain step on the sampled group,
i.e. Group DRO SFT, and costs one backward.

Batches: the step is called as step(model, next_batch, engine), where `next_batch(group) -> batch` returns the
next batch of that group (already on the model's device). A callable is used rather than a dict of one batch
per group because the group is only known inside the step: only the sampled group's data stream advances and
nothing is collated for the other groups. A ready dict works too: pass `batches.__getitem__`.

The engine (training/engine.py) supplies the gradient at theta as a probe (`engine.grad`, averaged over ranks, not
accumulated), so eps is identical on every rank and the engine accumulates only the gradient it applies: the same
step runs in one process, under DDP and under DeepSpeed ZeRO 0-2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from hftlab.algorithms.curriculum import Schedule, make_schedule, use_perturbed
from hftlab.algorithms.perturbation import compute_eps, perturbed
from hftlab.algorithms.sampler import GroupSampler
from hftlab.algorithms.sft import causal_lm_loss

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]
OBJECTIVES = ("stochastic", "weighted")


class VAAStep:
    """A stateful algorithm step: call it as step(model, next_batch, engine) -> stats, once per optimizer step.

    Stats: loss (at theta), perturbed_loss (at theta + eps, nan when not computed), group, lambda,
    q_0 .. q_{G-1} (after this step's update) and n_backward. The generator (seeded by `seed` unless given)
    drives both the group draw and the stochastic coin, so ranks sharing a seed make identical choices.
    The sampler is updated with the perturbed loss on perturbed steps, as the official code does
    (`update_on_perturbed=True`); with False, always with the loss at theta.
    """

    def __init__(
        self,
        sampler: GroupSampler,
        *,
        rho: float,
        total_steps: int,
        schedule: Schedule | None = None,
        objective: str = "stochastic",
        seed: int = 0,
        generator: torch.Generator | None = None,
        loss_fn: LossFn = causal_lm_loss,
        update_on_perturbed: bool = True,
        reduce_fn: Callable[[float], float] | None = None,
    ) -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        self.sampler = sampler
        self.rho = float(rho)
        self.total_steps = total_steps
        self.schedule = schedule if schedule is not None else make_schedule("linear", 1.0)
        self.objective = objective
        self.generator = generator if generator is not None else torch.Generator().manual_seed(seed)
        self.loss_fn = loss_fn
        self.update_on_perturbed = update_on_perturbed
        self.reduce_fn = reduce_fn  # distributed: the mean loss over ranks, so every rank's q moves alike
        self.steps_done = 0

    def current_lambda(self) -> float:
        """lambda for the next step, from the schedule and the number of steps already taken."""
        return float(self.schedule(self.steps_done, self.total_steps))

    def __call__(self, model: torch.nn.Module, next_batch: Callable[[int], Batch], engine: Any) -> dict[str, float]:
        """One VAA optimizer step on one batch of the sampled group (see the module docstring)."""
        group = self.sampler.sample(self.generator)
        lam = self.current_lambda()
        if self.objective == "stochastic":
            perturb = use_perturbed(lam, self.generator) and self.rho > 0
            clean_weight, perturbed_weight = 0.0, 1.0
        else:
            perturb = lam > 0 and self.rho > 0
            clean_weight, perturbed_weight = 1.0 - lam, lam
        batch = next_batch(group)

        if not perturb:
            loss = self.loss_fn(model, batch)
            engine.backward(loss)
            n_backward, perturbed_loss = 1, math.nan
        else:
            loss = self.loss_fn(engine.module, batch)  # probe at theta: gives eps, reaches no optimizer
            grads = engine.grad(loss)
            with perturbed(engine.params, compute_eps(grads, self.rho)):
                loss_p = self.loss_fn(model, batch)
                engine.backward(loss_p if perturbed_weight == 1.0 else perturbed_weight * loss_p)
            if clean_weight > 0:  # the weighted form adds (1 - lambda) * g(theta), which the probe already holds
                engine.set_grads([gp + clean_weight * gc for gp, gc in zip(engine.get_grads(), grads, strict=True)])
            n_backward, perturbed_loss = 2, loss_p.item()
        engine.step()

        loss_value = loss.item()
        if self.reduce_fn is not None:
            loss_value = self.reduce_fn(loss_value)
            perturbed_loss = self.reduce_fn(perturbed_loss) if perturb else perturbed_loss
        self.sampler.update(group, perturbed_loss if (perturb and self.update_on_perturbed) else loss_value)
        self.steps_done += 1
        stats: dict[str, float] = {
            "loss": loss_value,
            "perturbed_loss": perturbed_loss,
            "group": group,
            "lambda": lam,
            "n_backward": n_backward,
        }
        stats.update({f"q_{i}": q for i, q in enumerate(self.sampler.probs())})
        return stats

    def state_dict(self) -> dict[str, Any]:
        """Steps taken, the sampler and the generator state: enough to resume the same sequence of choices."""
        return {"steps_done": self.steps_done, "sampler": self.sampler.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved (model and optimizer state are the engine's business)."""
        self.steps_done = int(state["steps_done"])
        self.sampler.load_state_dict(state["sampler"])
        self.generator.set_state(state["generator"])


def expected_backward(rho: float, objective: str, schedule: Schedule, total_steps: int) -> float:
    """Mean backward passes per step of a VAA run: what compute-matched SFT must spend per VAA step.

    A plain step costs one backward, a perturbed one two (probe + perturbed). Stochastic: step t perturbs with
    probability lambda_t, so 1 + mean lambda (1.5 under the linear 0 -> 1 curriculum); weighted: 2 whenever
    lambda_t > 0. rho = 0 never perturbs.
    """
    if total_steps <= 0 or rho == 0:
        return 1.0
    lams = [min(max(schedule(t, total_steps), 0.0), 1.0) for t in range(total_steps)]
    if objective == "stochastic":
        return 1.0 + sum(lams) / total_steps
    return 1.0 + sum(lam > 0 for lam in lams) / total_steps
