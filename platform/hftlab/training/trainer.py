"""Ray Train adapter: the worker loop of training/worker.py on N workers, DDP (gloo on CPU, nccl on GPU) or
DeepSpeed ZeRO 0-2. N workers follow one worker's trajectory up to float rounding (worker.py says why).

Checkpoints: every `checkpoint_every` steps (and at the end) the workers report a checkpoint through
`ray.train.report`: the weights (safetensors), and in train_state.pt the step, the optimizer (one file per rank
under ZeRO, whose optimizer state is partitioned), the algorithm step's state (VAA's q and generator, SafeGrad's
cached alignment gradient, Lisa's phase and anchors) and how far each batch stream has been read; the lr schedule's
position travels with the optimizer state. A restarted worker group resumes from the
latest one and continues exactly where it was: the same batches, choices and optimizer moments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hftlab.config.errors import ConfigError
from hftlab.config.schema import AlignConfig, FinetuneConfig
from hftlab.faults import CrashOnce
from hftlab.training.batches import Pair
from hftlab.training.worker import WorkerJob, run_worker, strip_training_state


class RaySession:
    """A Ray Train worker's side of worker.run_worker: its checkpoint to resume, its device, DDP, ray.train.report."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    def checkpoint_dir(self) -> str | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        return ckpt.to_directory() if ckpt is not None else None

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def report(self, metrics: dict, directory: str | None) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if directory else None)


def loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on each Ray Train worker: worker.run_worker with this worker's session."""
    run_worker(config["job"], RaySession())


def train_distributed(stage: AlignConfig | FinetuneConfig, parent: str, pairs: list[Pair], out_dir: str | Path, *,
                      workers: int, seed: int, template: str, max_length: int, storage_path: str,
                      groups: list[int | None] | None = None, side: list[Pair] | None = None, threads: int = 1,
                      use_gpu: bool = False, max_failures: int = 0, crash: CrashOnce | None = None,
                      dtype: str = "float32", trust_remote_code: bool = False, field: str = "use_gpu") -> dict:
    """Train `parent` on `pairs` with a Ray Train TorchTrainer; the trained model lands in `out_dir`.

    Each worker loads the parent with `dtype` and `trust_remote_code` (base.*) and the stage's LoRA; a LoRA stage
    lands as its adapter + hftlab_parent.json, like an in-process one. `use_gpu`: one GPU per worker and nccl;
    without enough GPUs in the cluster it fails before starting, naming `field`.
    The run is named after `out_dir`, so rerunning a stage that crashed resumes from its latest checkpoint.
    `crash` injects a fault (faults.CrashOnce, for tests): the first attempt dies after that step.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if use_gpu:
        check_gpus(workers, field)
    job = WorkerJob(stage, parent, list(pairs), groups, side, seed, template, max_length, threads=threads, dtype=dtype,
                    trust_remote_code=trust_remote_code, use_gpu=use_gpu, crash=crash)
    trainer = TorchTrainer(
        loop_per_worker, train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": threads}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(storage_path=str(Path(storage_path).resolve()), name=f"train-{Path(out_dir).name}",
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    out = Path(out_dir)
    result.checkpoint.to_directory(str(out))
    strip_training_state(out)
    return dict(result.metrics or {})


def check_gpus(workers: int, field: str, *, cluster: bool = True) -> None:
    """Fail at once, naming `field`, when GPUs are asked of a Ray cluster (one per worker) or this process without any."""
    if not cluster:
        if not torch.cuda.is_available():
            raise ConfigError(field, True, "asks for a GPU, and torch sees none in this process (no CUDA device)")
        return
    import ray

    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True, log_to_driver=False)
    have = int(ray.cluster_resources().get("GPU", 0))
    if have < workers:
        raise ConfigError(field, True, f"asks for one GPU per Ray Train worker ({workers}), and the Ray cluster has {have}")
