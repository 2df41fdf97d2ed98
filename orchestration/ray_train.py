"""Data-parallel training on Ray Train: one stage's training loop on ``TorchTrainer`` workers.

With ``ray.train.workers`` = 1 (and no ``use_gpu``) a stage trains in the driver process as it
always did, without Ray. Otherwise :func:`fit` runs the stage's worker function on
``ray.train.workers`` Ray Train workers of ``cpus_per_worker`` CPUs (and one GPU each with
``use_gpu``), DDP over gloo on CPU and nccl on GPU, on the pipeline's Ray
(:func:`orchestration.parallel.connect`). Every worker rebuilds the stage's context
(:func:`worker_context`: the same config, run directory and MLflow child run; the data from
Ray's object store) and runs the same loop as the driver would, told its place by a
:class:`Parallel`:

- each rank reads its own part of every global batch (``loader(..., rank, world_size)``); the
  global batch and so the learning rate and schedule are those of one worker;
- after every epoch the BatchNorm statistics of rank 0 are broadcast, so all ranks hold the
  same weights; rank 0 evaluates the holdout split and broadcasts the result, so every rank
  takes the same early-stopping decision;
- rank 0 writes the epoch snapshot (:class:`orchestration.checkpoints.Checkpointer`), reports
  it with ``ray.train.report`` and logs the epoch to the stage's MLflow run. A worker group
  restarted after a failure (``max_failures``) or a resubmitted job resumes from that snapshot.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from generalist.data.source import InMemorySource
from orchestration.config import ConfigError
from orchestration.config_sections import RayConfig, RayTrainConfig

STORAGE = "ray_train"          # Ray Train's own storage, inside the stage folder


class RayTrainError(ConfigError):
    """Data-parallel training cannot run with these settings on this cluster; names the keys to change."""


def on_ray_train(cfg: RayTrainConfig) -> bool:
    """Whether a stage trains on Ray Train workers (else in the driver process)."""
    return cfg.workers > 1 or cfg.use_gpu


@dataclass(frozen=True)
class Parallel:
    """Where a training loop runs: its rank among ``world_size`` data-parallel workers."""

    rank: int = 0
    world_size: int = 1
    on_ray: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def steps_per_epoch(self, examples: int, batch_size: int) -> int:
        """Optimizer steps per epoch: every batch on one worker; complete global batches on many."""
        if self.world_size == 1:
            return -(-examples // batch_size)
        if examples < batch_size:
            raise RayTrainError(f"the global batch of {batch_size} is larger than the {examples} training "
                                "examples; lower the batch size or ray.train.workers")
        return examples // batch_size

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to train: DDP over the ranks on Ray Train, ``model`` itself otherwise."""
        if not self.on_ray:
            return model
        from ray.train.torch import prepare_model

        # BatchNorm statistics are not broadcast before every forward pass: training uses batch
        # statistics, rank 0 alone evaluates, and sync_buffers gives every rank rank 0's at the
        # end of each epoch, so the weights are the same and each step has one collective less.
        return prepare_model(model, move_to_device=False, parallel_strategy_kwargs={"forward_sync_buffers": False})

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every rank."""
        if self.world_size > 1:
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def barrier(self) -> None:
        """Wait for every rank (e.g. until rank 0 has written a file the others read)."""
        if self.world_size > 1:
            torch.distributed.barrier()

    def from_main(self, compute: Callable[[], dict[str, float]]) -> dict[str, float]:
        """``compute()`` run on rank 0, its result on every rank."""
        if self.world_size == 1:
            return compute()
        box = [compute() if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The ranks' mean of each value (each rank saw as many examples)."""
        if self.world_size == 1:
            return values
        stacked = torch.tensor(list(values.values()), dtype=torch.float64)  # (V,)
        torch.distributed.all_reduce(stacked)
        return dict(zip(values, (stacked / self.world_size).tolist(), strict=True))

    def total(self, value: float) -> float:
        """The sum over the ranks (e.g. images/s of the whole group)."""
        if self.world_size == 1:
            return value
        summed = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(summed)
        return float(summed[0])

    def report(self, metrics: dict[str, float], snapshot: Path | None) -> None:
        """Report the epoch to Ray Train, rank 0 with its snapshot folder (every rank calls it)."""
        if not self.on_ray:
            return
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(snapshot)) if snapshot and self.is_main else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def checksums(self, model: nn.Module) -> list[str]:
        """The sha256 of every rank's weights and buffers, by rank (equal after a healthy run)."""
        digest = weights_sha256(model)
        if self.world_size == 1:
            return [digest]
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, digest)
        return [str(g) for g in gathered]


SINGLE = Parallel()


def weights_sha256(model: nn.Module) -> str:
    """sha256 over the state dict's tensors, in key order."""
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_replicas(logger: Any, par: Parallel, model: nn.Module, *, tag: str) -> None:
    """RuntimeError when the ranks' weights differ after training; rank 0 first tags their
    sha256 (by rank, comma-separated) as ``tag`` on ``logger``'s MLflow run."""
    digests = par.checksums(model)
    if par.is_main:
        logger.set_tags({tag: ",".join(digests)})
    if len(set(digests)) > 1:
        raise RuntimeError(f"the {par.world_size} data-parallel replicas hold different weights after "
                           f"training (sha256 by rank: {digests}); DDP did not keep them in step")


# ------------------------------------------------------------------------------- driver


def check_cluster(cfg: RayTrainConfig) -> None:
    """RayTrainError unless the connected Ray can ever place every worker (Ray would wait forever)."""
    import ray

    from orchestration.parallel import cluster_summary

    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    gpus = sum(r.get("GPU", 0.0) for r in nodes)
    if cfg.use_gpu and gpus < cfg.workers:
        raise RayTrainError(
            f"ray.train.use_gpu=true asks for {cfg.workers} GPU workers but the cluster has {gpus:g} GPUs "
            f"({cluster_summary()}); set ray.train.use_gpu=false or lower ray.train.workers")
    per_node = [int(r.get("CPU", 0.0) // cfg.cpus_per_worker) for r in nodes
                if not cfg.use_gpu or r.get("GPU", 0.0) >= 1]
    if sum(per_node) < cfg.workers:
        raise RayTrainError(
            f"ray.train.workers={cfg.workers} x ray.train.cpus_per_worker={cfg.cpus_per_worker:g} CPUs do not "
            f"fit on the cluster ({cluster_summary()}); lower ray.train.workers or ray.train.cpus_per_worker, "
            "or give the local Ray more CPUs (ray.local_num_cpus)")


def fit(worker: Callable[[dict[str, Any]], None], payload: dict[str, Any], cfg: RayConfig, *,
        storage: Path, name: str) -> None:
    """Run ``worker(payload)`` on ``cfg.train.workers`` Ray Train workers; once the restarts
    (``max_failures``) are spent, raises the first failed rank's own error (e.g. a NaN loss)."""
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        RunConfig,
        ScalingConfig,
        WorkerGroupError,
    )
    from ray.train.torch import TorchConfig, TorchTrainer

    from orchestration.parallel import connect

    connect(cfg.address, local_num_cpus=cfg.local_num_cpus)
    train = cfg.train
    check_cluster(train)
    resources = {"CPU": train.cpus_per_worker, **({"GPU": 1} if train.use_gpu else {})}
    trainer = TorchTrainer(
        worker, train_loop_config={**payload, "cpus_per_worker": train.cpus_per_worker},
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=train.workers, use_gpu=train.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=str(Path(storage).resolve()),
                             failure_config=FailureConfig(max_failures=train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    try:
        trainer.fit()
    except WorkerGroupError as exc:
        raise first_failure(exc) from exc


def first_failure(exc: Any) -> BaseException:
    """The lowest failed rank's own exception (unwrapped from Ray's task error), else ``exc``."""
    failures = [getattr(e, "cause", None) or e for _, e in sorted(exc.worker_failures.items())]
    return failures[0] if failures else exc


def absolute_uri(uri: str) -> str:
    """Workers run in other folders (and nodes): a relative sqlite/file store made absolute."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if "://" not in uri:
        return str(Path(uri).resolve())
    return uri


def stage_payload(ctx, **extra: Any) -> dict[str, Any]:
    """What a worker needs to rebuild ``ctx``: config, absolute paths, the MLflow run, the data."""
    import ray

    from orchestration.tracking import resolve_tracking_uri

    uri = ctx.tracker.uri if ctx.tracker else resolve_tracking_uri(ctx.config.tracking.uri)
    return {"config": ctx.config, "run_dir": str(ctx.run_dir.path.resolve()),
            "stage_dir": str(ctx.stage_dir.resolve()), "run_id": ctx.logger.run_id,
            "tracking_uri": absolute_uri(uri),
            "source": ray.put(ctx.source()), **extra}


def worker_source(handle: Any) -> Any:
    """The stage's ExampleSource in a worker, put in the object store once by the driver: a
    streaming source travels as its location (a few KB) and each worker reads its own shards;
    an in-memory one (small data) carries its arrays."""
    import ray

    return ray.get(handle)


def _in_memory_only(source: Any) -> Callable[[], Any]:
    def load() -> Any:
        if isinstance(source, InMemorySource):
            return source.bundle
        raise RuntimeError("a data-parallel worker reads streamed data through ctx.source(), never ctx.data()")
    return load


# ------------------------------------------------------------------------------- worker


RAY_TRAIN_CHATTY = ("ray.train.v2._internal.execution.context", "ray.train.v2._internal.execution.storage")


def _quiet_reports() -> None:
    """Ray Train logs a line per report and per checkpoint from every worker (two per epoch and
    rank); the stage prints its own epoch line, so those go to WARNING in this worker."""
    for name in RAY_TRAIN_CHATTY:
        try:
            module = importlib.import_module(name)
        except ImportError:       # another Ray version: its own logging stays as it is
            continue
        chatty = getattr(module, "logger", None)
        if isinstance(chatty, logging.Logger):
            chatty.setLevel(logging.WARNING)


def worker_context(payload: dict[str, Any]):
    """This worker's StageContext (rank 0 prints and logs; the others stay quiet) and Parallel."""
    import ray.train
    from mlflow.tracking import MlflowClient
    from ray.train.torch import get_device
    from rich.console import Console

    from orchestration.pipeline import StageContext
    from orchestration.rundir import RunDir
    from orchestration.tracking import Connection, RunLogger

    torch.set_num_threads(max(1, int(payload["cpus_per_worker"])))
    _quiet_reports()
    context = ray.train.get_context()
    par = Parallel(context.get_world_rank(), context.get_world_size(), on_ray=True)
    run_dir, uri = Path(payload["run_dir"]), payload["tracking_uri"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    source = worker_source(payload["source"])
    ctx = StageContext(
        config=payload["config"], run_dir=RunDir(run_dir), stage_dir=Path(payload["stage_dir"]),
        logger=RunLogger(client, payload["run_id"], Connection(client, uri, run_dir)),
        console=Console(soft_wrap=True, quiet=not par.is_main, highlight=False),
        device=get_device(), load_data=_in_memory_only(source), upstream={}, tracker=None,
    )
    ctx._source = source
    return ctx, par
