"""Ray Train adapter: the same algorithm cores (SFT, VAA) on N workers with DDP (gloo on CPU, nccl on GPU).

Every worker builds the same global batches from the same seed and trains on its slice of each
(training/batches.py: rows rank, rank + W, ...). The loss is the token sum of the slice divided by the
global batch's token count / W, so DDP's gradient average equals the single-process mean-token gradient:
1 worker and W workers follow the same trajectory up to float rounding. The VAA sampler and coin
use the same seed on every rank, and its perturbation norm is taken from the all-reduced gradient,
so all ranks draw the same group and apply the same eps.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from hftlab.config.schema import AlignConfig, FinetuneConfig
from hftlab.training.batches import Pair, batches, encode


def token_sum_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of response-token cross-entropy on this slice / batch["norm"] (global tokens / world size)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="sum")
    return nll / batch["norm"]


def loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on each Ray Train worker: load, wrap in DDP, train with the configured step, rank 0 saves."""
    import ray.train
    import ray.train.torch

    from hftlab.models.loading import load_model
    from hftlab.training.engine import LocalEngine

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    torch.manual_seed(config["seed"])
    model, tokenizer = load_model(config["parent"])
    stage: AlignConfig | FinetuneConfig = config["stage"]
    if stage.zero_stage is None:
        model = ray.train.torch.prepare_model(model)  # DDP
        engine = LocalEngine(model, stage.lr, stage.weight_decay)
    else:
        from hftlab.training.engine import DeepSpeedEngine

        engine = DeepSpeedEngine(model, stage.lr, stage.weight_decay, zero_stage=stage.zero_stage)
        model = engine.model  # forward through DeepSpeed's engine; it averages gradients over ranks like DDP
    device = next(model.parameters()).device
    encoded = encode(tokenizer, config["pairs"], config["template"], config["max_length"])
    model.train()
    steps, last = 0, float("nan")
    if stage.method == "vaa":
        step, next_batch, total = _vaa_step(config, encoded, tokenizer, rank, world, device)
        for _ in range(total):
            steps, last = steps + 1, step(model, next_batch, engine)["loss"]
    else:
        for epoch in range(stage.epochs):
            for batch in batches(encoded, stage.batch_size, tokenizer.pad_token_id, config["seed"], epoch, rank, world):
                loss = token_sum_loss(model, {k: v.to(device) for k, v in batch.items()})
                engine.backward(loss)
                engine.step()
                steps, last = steps + 1, loss.item()
    metrics = {"steps": steps, "last_loss": last, "world_size": world}
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            inner = model.module if hasattr(model, "module") else model
            inner.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics)


def _mean_over_ranks(value: float) -> float:
    """Each rank holds its slice's share of the global mean loss: their mean is the global mean loss."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def _vaa_step(config: dict, encoded: list, tokenizer, rank: int, world: int, device: torch.device):
    """(VAAStep, next_batch, total steps) over per-group streams of this rank's slices (same group on every rank)."""
    from hftlab.training.grouped import group_stream, vaa_setup

    stage: AlignConfig = config["stage"]
    members, step, total = vaa_setup(encoded, config["groups"], stage.vaa, epochs=stage.epochs,
                                     batch_size=stage.batch_size, seed=config["seed"],
                                     loss_fn=token_sum_loss, reduce_fn=_mean_over_ranks)
    streams = [group_stream(m, stage.batch_size, tokenizer.pad_token_id, config["seed"] + k, rank, world)
               for k, m in enumerate(members)]

    def next_batch(group: int) -> dict:
        return {k: v.to(device) for k, v in next(streams[group]).items()}

    return step, next_batch, total


def train_distributed(stage: AlignConfig | FinetuneConfig, parent: str, pairs: list[Pair], out_dir: str | Path, *,
                      workers: int, seed: int, template: str, max_length: int, storage_path: str,
                      groups: list[int | None] | None = None, threads: int = 1, use_gpu: bool = False) -> dict:
    """Train `parent` on `pairs` with a Ray Train TorchTrainer; the trained model lands in `out_dir`."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    config = {"stage": stage, "parent": parent, "pairs": list(pairs), "groups": groups, "seed": seed,
              "template": template, "max_length": max_length, "threads": threads}
    trainer = TorchTrainer(
        loop_per_worker, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": threads}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(storage_path=str(Path(storage_path).resolve()), name=f"train-{Path(out_dir).name}"),
    )
    result = trainer.fit()
    result.checkpoint.to_directory(str(out_dir))
    return dict(result.metrics or {})
