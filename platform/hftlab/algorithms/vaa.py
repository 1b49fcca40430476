"""VAA (Vulnerability-Aware Alignment): Group DRO over alignment groups plus a group-specific SAM perturbation.

Each step: the sampler draws a group g from q, the step trains on one batch of g, and q moves toward groups with
higher loss. The perturbation makes the update robust to a small worst-case weight change, lambda (curriculum)
decides how much of the step is perturbed. Two objective forms:

- "stochastic" (the official ChanLiang/VAA code): with probability 1 - lambda_t a plain SFT step on the batch;
  otherwise the gradient at theta gives eps = rho * g / ||g||, the loss is recomputed at theta + eps, theta is
  restored and the optimizer steps with the perturbed gradient only. One backward on plain steps, two on
  perturbed ones: about 1.5x SFT on average under a linear 0 -> 1 curriculum.
- "weighted" (the paper's objective): (1 - lambda) l(theta) + lambda l(theta + eps), i.e. the gradients of both
  terms summed with those weights. Two backwards whenever lambda > 0.

rho = 0 means no perturbation at all (l(theta + 0) = l(theta)): every step is a plain step on the sampled group,
i.e. Group DRO SFT, and costs one backward.

Batches: the step is called as step(model, next_batch, engine), where `next_batch(group) -> batch` returns the
next batch of that group (already on the model's device). A callable is used rather than a dict of one batch
per group because the group is only known inside the step: only the sampled group's data stream advances and
nothing is collated for the other groups. A ready dict works too: pass `batches.__getitem__`.

The perturbation reads and writes `p.grad` between the two backwards, so the engine's gradients must live in
`p.grad` (LocalEngine, DDP); see perturbation.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from hftlab.algorithms.curriculum import Schedule, make_schedule, use_perturbed
from hftlab.algorithms.perturbation import GradNormFn, compute_eps, perturbed, trainable_params
from hftlab.algorithms.sampler import GroupSampler
from hftlab.algorithms.sft import causal_lm_loss

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]
OBJECTIVES = ("stochastic", "weighted")


@torch.no_grad()
def _scale_grads(params: list[torch.nn.Parameter], weight: float) -> None:
    """grad <- weight * grad; weight 0 drops the gradients (so only the perturbed gradient remains)."""
    for p in params:
        if p.grad is None or weight == 1.0:
            continue
        if weight == 0.0:
            p.grad = None
        else:
            p.grad.mul_(weight)


class VAAStep:
    """A stateful algorithm step: call it as step(model, next_batch, engine) -> stats, once per optimizer step.

    Stats: loss (at theta), perturbed_loss (at theta + eps, nan when not computed), group, lambda,
    q_0 .. q_{G-1} (after this step's update) and n_backward. The generator (seeded by `seed` unless given)
    drives both the group draw and the stochastic coin, so ranks sharing a seed make identical choices.
    The sampler is updated with the loss at theta; `update_on_perturbed=True` instead feeds it the perturbed
    loss on perturbed steps, as the official code does.
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
        grad_norm_fn: GradNormFn | None = None,
        loss_fn: LossFn = causal_lm_loss,
        update_on_perturbed: bool = False,
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
        self.grad_norm_fn = grad_norm_fn
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
        params = trainable_params(model)

        loss = self.loss_fn(model, batch)
        engine.backward(loss)
        n_backward, perturbed_loss = 1, math.nan
        if perturb:
            eps = compute_eps(params, self.rho, self.grad_norm_fn)  # from the gradient at theta, before rescaling
            _scale_grads(params, clean_weight)
            with perturbed(params, eps):
                loss_p = self.loss_fn(model, batch)
                engine.backward(loss_p if perturbed_weight == 1.0 else perturbed_weight * loss_p)
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
