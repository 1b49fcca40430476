"""Vaccine (Huang et al. 2024, "Vaccine: Perturbation-aware Alignment for LLMs against Harmful Fine-tuning").

Harmful fine-tuning drifts the hidden embeddings of the alignment data ("harmful embedding drift"). Vaccine aligns
the model so that its alignment loss stays low even when the hidden states are pushed by a small worst-case
perturbation: a SAM-like min-max, but on activations instead of weights. Each step:

1. probe: forward the alignment batch through the bare model with hooks recording each hooked module's output h_m,
   and take g_m = d loss / d h_m (activation gradients only: `torch.autograd.grad(loss, [h_m ...])`, no parameter
   gradient is formed and no `.grad` is touched);
2. eps_m = rho * g_m / (||g|| + 1e-7), ||g|| the L2 norm over all hooked modules, tokens and rows together;
3. update: forward again through `engine.model` with hooks adding eps_m to each module's output, one backward,
   one optimizer step. The hooks are removed in `finally`, also when the forward or backward raises.

Cost: one forward + an activation-only backward + one forward/backward, a bit under 2x SFT.

As git-disl/Vaccine runs it (`VaccineTrainer`, trainer.py @ 8937f68):
- hooked modules: every self-attention module (`get_leaf_modules_with_grad`, L36-L50: LlamaAttention,
  OPTAttention), i.e. the attention block's output after o_proj, before the residual add. Ours: modules whose
  class name ends with `module_suffix`, "Attention" by default (config `align.vaccine.layers: attention`);
  "DecoderLayer" perturbs each decoder layer's output, the residual stream (`layers: decoder`).
- g_m: the first pass's gradient at the module output (legacy backward hook, grad_output[0], L92-L106);
  ||g|| over all modules (`_grad_norm`, L168-L181); eps = g * rho / (||g|| + 1e-7) (L143-L151).
- the second pass adds eps to output[0] through `.data`, a constant to autograd (L111-L134); the optimizer sees
  only this pass's gradient (L83-L88); rho defaults to 2 (train.py:L253).
Deviations, all deliberate:
- the reference's first pass is a full backward whose parameter gradients are then zeroed (L83-L85); ours forms
  only the activation gradients, which is cheaper and leaves the optimizer state alone.
- rho = 0 is plain SFT (one backward) rather than a second pass with a zero perturbation.

Distributed: the probe runs on this rank's slice of the batch, so g_m is per rank (activations are per sample;
there is nothing to average). With `sync_norm` (default) the squared norm is summed over ranks (one all-reduce of
a scalar), so with the token-sum-normalised loss of training/worker.py eps equals the one-process eps exactly
(each rank's gradient is W times the one-process one on its rows, and so is the summed norm). Without it the norm
is per rank. The update gradient itself is averaged by DDP/DeepSpeed as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from hftlab.algorithms.collective import sum_over_ranks
from hftlab.algorithms.sft import causal_lm_loss

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]
NORM_EPS = 1e-7  # the reference's `grad_norm + 1e-7` (trainer.py:L149)


def find_layers(model: torch.nn.Module, suffix: str = "DecoderLayer") -> list[torch.nn.Module]:
    """The modules whose class name ends with `suffix`, in forward order (LlamaAttention, Qwen2DecoderLayer, ...)."""
    layers = [m for m in model.modules() if type(m).__name__.endswith(suffix)]
    if not layers:
        raise ValueError(f"no module whose class name ends with {suffix!r} in {type(model).__name__}")
    return layers


def _hidden(output: Any) -> torch.Tensor:
    """The hidden state in a layer's output: the tensor itself, or the first element of a tuple (older HF layers)."""
    return output if isinstance(output, torch.Tensor) else output[0]


def _replace_hidden(output: Any, hidden: torch.Tensor) -> Any:
    return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])


@contextmanager
def hooked(layers: list[torch.nn.Module], hook: Callable[[torch.nn.Module, Any, Any], Any]) -> Iterator[None]:
    """Register `hook` as a forward hook on every layer for the duration of the block; always removed."""
    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class VaccineStep:
    """An alignment step: step(model, batch, engine) -> stats, once per optimizer step.

    Stats: loss (alignment loss at theta, unperturbed), perturbed_loss (with eps on the hooked outputs; nan when
    rho = 0), hidden_grad_norm (||g|| before scaling; nan when rho = 0), n_backward (2, or 1 when rho = 0).
    """

    def __init__(self, *, rho: float = 2.0, loss_fn: LossFn = causal_lm_loss, module_suffix: str = "Attention",
                 sync_norm: bool = True) -> None:
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        self.rho = float(rho)
        self.loss_fn = loss_fn
        self.module_suffix = module_suffix
        self.sync_norm = sync_norm

    def perturbation(self, module: torch.nn.Module, batch: Batch, layers: list[torch.nn.Module]
                     ) -> tuple[torch.Tensor, dict[torch.nn.Module, torch.Tensor], torch.Tensor]:
        """The probe: (clean loss, eps per layer, ||g||). Forward through the bare module, activation gradients only."""
        hidden: dict[torch.nn.Module, torch.Tensor] = {}

        def record(layer: torch.nn.Module, _inputs: Any, output: Any) -> None:
            hidden.setdefault(layer, _hidden(output))  # first call only (a checkpointed layer reruns its forward)

        with hooked(layers, record):
            loss = self.loss_fn(module, batch)
        tracked = [layer for layer in layers if layer in hidden and hidden[layer].requires_grad]
        grads = torch.autograd.grad(loss, [hidden[layer] for layer in tracked], allow_unused=True) if tracked else []
        grads = [torch.zeros_like(hidden[layer]) if g is None else g.detach() for layer, g in zip(tracked, grads, strict=True)]
        sq = torch.stack([g.float().pow(2).sum() for g in grads]).sum() if grads else loss.new_zeros((), dtype=torch.float32)
        norm = (sum_over_ranks(sq) if self.sync_norm else sq).sqrt()
        scale = self.rho / (norm + NORM_EPS)
        eps = {layer: (g.float() * scale).to(g.dtype) for layer, g in zip(tracked, grads, strict=True)}
        return loss.detach(), eps, norm

    def __call__(self, model: torch.nn.Module, batch: Batch, engine: Any) -> dict[str, float]:
        """One Vaccine optimizer step on one alignment batch (see the module docstring)."""
        if self.rho == 0:
            loss = self.loss_fn(model, batch)
            engine.backward(loss)
            engine.step()
            return {"loss": loss.item(), "perturbed_loss": float("nan"), "hidden_grad_norm": float("nan"), "n_backward": 1}

        layers = find_layers(engine.module, self.module_suffix)
        loss, eps, norm = self.perturbation(engine.module, batch, layers)

        def add_eps(layer: torch.nn.Module, _inputs: Any, output: Any) -> Any:
            e = eps.get(layer)
            return output if e is None else _replace_hidden(output, _hidden(output) + e)

        with hooked(layers, add_eps):  # removed before step(), and on any error
            loss_p = self.loss_fn(model, batch)
            engine.backward(loss_p)
        engine.step()
        return {"loss": loss.item(), "perturbed_loss": loss_p.item(), "hidden_grad_norm": norm.item(), "n_backward": 2}
