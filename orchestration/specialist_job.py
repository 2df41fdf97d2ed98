"""What one specialist's worker does (a Ray task of the specialists stage; no Ray in here).

Reads top to bottom: open the data (:mod:`orchestration.data_access`) and read only the group's
own examples (``class_positions`` of its classes, then ``take`` of each half-and-half batch and
of the balanced holdout), build the specialist from the generalist checkpoint, resume from the
last epoch snapshot if there is one, train on half-and-half batches with early stopping on
the balanced holdout loss, prior-correct the best epoch, and write ``model.safetensors`` +
``model.json`` (written last: the group is done). Everything lives in the group's folder on
shared storage, so a retried task on any node picks up where the dead one stopped::

    GROUP/worker.pid                       pid of the process training it (tests kill it)
    GROUP/progress.json                    per-epoch records and resumes (the driver prints them)
    GROUP/checkpoints/                     epoch snapshots (orchestration.checkpoints.Checkpointer:
                                           weights, optimizer, scheduler, stopper, progress; the
                                           latest and the best epoch), removed when done
    GROUP/model.safetensors, model.json    the prior-corrected specialist
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from generalist.data.augment import AugmentSpec, augmented_batches
from generalist.data.source import ExampleSource
from generalist.train import (
    EarlyStopping,
    mixed_precision,
    plateau_epoch_end,
    set_seed,
    train_one_epoch,
)
from orchestration.artifacts import CHECKPOINTS, MODEL, PID_FILE, PROGRESS, load_generalist
from orchestration.builders import optimizer_and_schedule
from orchestration.checkpoints import (
    Checkpointer,
    CheckpointError,
    read_metadata,
    save_model,
    verify_model_files,
)
from orchestration.config import SpecialistsConfig
from orchestration.data_access import SourceDescriptor, open_descriptor
from orchestration.files import read_json, write_json
from specialists.model import build_specialist, reinitialise_trailing
from specialists.prior import (
    apply_prior_correction,
    dustbin_log_correction,
    shift_to_training_mix,
)
from specialists.sampler import HalfAndHalfBatchSampler, balanced_positions, specialist_targets
from specialists.train import (
    SoftTargetLoss,
    evaluate_specialist,
    init_invariant_maxdiff,
)

INVARIANT_EXAMPLES = 64


@dataclass(frozen=True)
class SpecialistJob:
    """Everything a worker needs besides the data (picklable; paths on shared storage)."""

    group_id: int
    classes: tuple[int, ...]
    names: tuple[str, ...]
    group_dir: str
    run_dir: str
    seed: int
    settings: SpecialistsConfig
    augment: AugmentSpec = AugmentSpec()
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    cpu_bf16: bool = False       # run.cpu_bf16: bf16 mixed precision where this worker's CPU has it

    @property
    def dir(self) -> Path:
        return Path(self.group_dir)


def is_finished(job: SpecialistJob) -> bool:
    """True when the group's corrected model was written for exactly these classes."""
    meta_path = job.dir / f"{MODEL}.json"
    if not (meta_path.exists() and (job.dir / f"{MODEL}.safetensors").exists()):
        return False
    try:
        meta = read_metadata(job.dir / MODEL)
        verify_model_files(job.dir / MODEL)  # a truncated model is retrained, not trusted
    except CheckpointError:
        return False
    return meta.get("specialist", {}).get("classes") == list(job.classes)


def train_specialist(job: SpecialistJob, data: SourceDescriptor) -> dict[str, Any]:
    """Train, correct and save one specialist; returns the summary written to ``model.json``.

    ``data`` is a descriptor of :func:`orchestration.data_access.source_descriptor` (in-memory
    ``train_images (N, C, H, W) uint8``, ``train_labels (N,)``, ``holdout_images``,
    ``holdout_labels``, or a streaming source); only the group's examples are read from it.
    """
    cfg = job.settings
    torch.set_num_threads(max(1, int(cfg.cpus_per_specialist)))
    job.dir.mkdir(parents=True, exist_ok=True)
    (job.dir / PID_FILE).write_text(str(os.getpid()))
    device = torch.device("cuda" if cfg.gpus_per_specialist > 0 and torch.cuda.is_available() else "cpu")
    generalist, gen_meta = load_generalist(job.run_dir)
    set_seed(job.seed)
    model = build_specialist(generalist, job.classes, finetune=cfg.finetune, last_n=cfg.last_n,
                             train_out_rows=cfg.reinit_blocks > 0).to(device)

    source = open_descriptor(data)
    holdout = _balanced_holdout(source, job)
    invariant = init_invariant_maxdiff(generalist, model, holdout[0][:INVARIANT_EXAMPLES])
    start = None  # the generalist's own holdout figures, when the specialist does not start from it
    if cfg.reinit_blocks:
        start = _evaluate(job, model, holdout, device)  # = the generalist's, by the init invariant
        reinitialise_trailing(model, cfg.reinit_blocks)
    sampler = HalfAndHalfBatchSampler.from_positions(
        source.class_positions("train", job.classes), source.size("train"), job.classes,
        batch_size=cfg.batch_size, num_batches=cfg.num_batches, seed=job.seed)
    pi_m = len(sampler.in_indices) / source.size("train")  # the group's share of the training set
    shift_to_training_mix(model, pi_m, sampler.in_group_fraction)
    optimizer, scheduler = optimizer_and_schedule(model, cfg.optimizer, steps_per_epoch=len(sampler),
                                                  epochs=cfg.epochs)
    stopper = EarlyStopping(patience=cfg.patience)
    stateful = {"optimizer": optimizer, "scheduler": scheduler, "early_stopping": stopper}
    progress = _resume(job, model, stateful)
    if not progress["epochs"]:
        progress["init"] = _evaluate(job, model, holdout, device)
        if start is not None:
            progress["generalist"] = start
        write_json(job.dir / PROGRESS, progress)
        _log(job, {f"holdout_{k}": v for k, v in progress["init"].items()}, step=0)

    soft = _soft_loss(job, generalist.to(device), sampler, pi_m)
    for epoch in range(len(progress["epochs"]) + 1, cfg.epochs + 1):
        if stopper.should_stop:
            break
        sampler.set_epoch(epoch)
        batches = augmented_batches(_group_batches(source, job.classes, sampler, device),
                                    job.augment, seed=job.seed, epoch=epoch)
        result = train_one_epoch(model, _teach(batches, soft), optimizer, scheduler, epoch=epoch,
                                 device=device, loss_fn=soft,
                                 amp=mixed_precision(device, cuda=False, cpu_bf16=job.cpu_bf16))
        scores = _evaluate(job, model, holdout, device)
        plateau_epoch_end(scheduler, scores["loss"])
        improved = stopper.improves(scores["loss"])
        stopper.step(scores["loss"], epoch)
        record = {"epoch": epoch, "train_loss": result.loss, "train_top1": result.accuracy,
                  "examples": result.examples, "examples_per_s": result.examples_per_s, "seconds": result.seconds,
                  **{f"holdout_{k}": v for k, v in scores.items()}}
        _log(job, {k: v for k, v in record.items() if k != "epoch"}, step=epoch)  # at least once
        progress["epochs"].append(record)
        _checkpoint(job, model, stateful, progress, improved)
    return _finish(job, model, gen_meta, pi_m, sampler, progress, invariant)


def _balanced_holdout(source: ExampleSource, job: SpecialistJob) -> tuple[Tensor, Tensor]:
    """The group's holdout examples and as many others: ``(M, C, H, W)`` uint8 images and
    ``(M,)`` specialist targets (:func:`specialists.sampler.balanced_positions`)."""
    inside = source.class_positions("holdout", job.classes)
    if len(inside) == 0:
        raise ValueError(f"no holdout example has a label in group {job.classes}; the specialist "
                         "cannot be early-stopped: raise the holdout size")
    split = source.take("holdout", balanced_positions(inside, source.size("holdout"), seed=job.seed))
    return split.images, specialist_targets(split.labels, job.classes)


def _group_batches(source: ExampleSource, classes: tuple[int, ...], sampler: HalfAndHalfBatchSampler,
                   device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    """``(x (B, C, H, W) float32 in [0, 1], y (B,) specialist targets)`` of the sampler's batches,
    each read from the training split with one ``take``."""
    for positions in sampler:
        split = source.take("train", np.asarray(positions, dtype=np.int64))
        yield split.images.to(device).float().div_(255.0), specialist_targets(split.labels, classes).to(device)


def _soft_loss(job: SpecialistJob, generalist, sampler, pi_m: float) -> SoftTargetLoss | None:
    """The hard + soft target loss (``specialists.soft_targets`` > 0), else None (cross-entropy)."""
    cfg = job.settings
    if cfg.soft_targets <= 0:
        return None
    shift = -dustbin_log_correction(pi_m, sampler.in_group_fraction)
    return SoftTargetLoss(generalist, job.classes, weight=cfg.soft_targets, temperature=cfg.temperature,
                          dustbin_shift=shift)


def _teach(batches, soft: SoftTargetLoss | None):
    """The batches, each first shown to the generalist when soft targets are on."""
    for x, y in batches:
        if soft is not None:
            soft.set_batch(x)
        yield x, y


def _evaluate(job: SpecialistJob, model, holdout, device) -> dict[str, float]:
    images, targets = holdout
    scores = evaluate_specialist(model, images, targets, dustbin_index=len(job.classes),
                                 batch_size=job.settings.eval_batch_size, device=device)
    return {k: v for k, v in scores.items() if k != "examples"}


def _checkpoint(job, model, stateful, progress, improved: bool) -> None:
    """The epoch snapshot (weights, optimizer state and the progress, marked best when it
    improved), then the progress mirror the driver reads."""
    epoch = len(progress["epochs"])
    Checkpointer(job.dir / CHECKPOINTS).save(
        epoch, model, stateful, extra={"classes": list(job.classes), "progress": progress},
        metadata={"classes": list(job.classes)}, best=improved)
    write_json(job.dir / PROGRESS, progress)


def _fresh_progress() -> dict[str, Any]:
    return {"epochs": [], "resumes": [], "init": None, "warnings": []}


def _resume(job: SpecialistJob, model, stateful) -> dict[str, Any]:
    """Load the last epoch snapshot (if any) and return the progress record to continue from.

    A corrupt snapshot, or one for other classes, is noted in the progress warnings and the
    specialist restarts."""
    checkpoints = Checkpointer(job.dir / CHECKPOINTS)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        snapshot = checkpoints.resume(model, stateful)
        if snapshot is not None and snapshot.extra["classes"] != list(job.classes):
            raise CheckpointError(f"the snapshot is for classes {snapshot.extra['classes']}")
    except (CheckpointError, KeyError) as exc:
        checkpoints.clear()
        model.load_state_dict(initial)
        progress = _fresh_progress()
        progress["warnings"].append(f"cannot resume ({exc}); training from scratch")
        return progress
    if snapshot is None:
        return _fresh_progress()
    progress = snapshot.extra["progress"]
    progress["resumes"] = max(progress["resumes"], _mirrored_resumes(job), key=len)
    progress["resumes"].append({"from_epoch": snapshot.epoch, "pid": os.getpid(), "time": time.time()})
    write_json(job.dir / PROGRESS, progress)
    return progress


def _mirrored_resumes(job: SpecialistJob) -> list[dict[str, Any]]:
    """Resumes recorded in the mirror after the last snapshot (a worker died twice in a row)."""
    try:
        return list(read_json(job.dir / PROGRESS).get("resumes", []))
    except (OSError, ValueError):
        return []


def _finish(job, model, gen_meta, pi_m: float, sampler, progress, invariant) -> dict[str, Any]:
    """Prior-correct the best epoch, write the final model, return its summary."""
    checkpoints = Checkpointer(job.dir / CHECKPOINTS)
    if checkpoints.best_dir() is None:
        losses = [r["holdout_loss"] for r in progress["epochs"]]
        raise CheckpointError(f"specialist group {job.group_id} has no best epoch: no epoch gave a "
                              f"finite holdout loss ({losses}); lower specialists.optimizer.lr")
    best_epoch = checkpoints.load_best(model)
    corrected = apply_prior_correction(model.cpu(), pi_m, sampler.in_group_fraction)
    best = progress["epochs"][best_epoch - 1]
    metrics = {
        "best_holdout_loss": best["holdout_loss"], "best_holdout_top1": best["holdout_top1"],
        "best_group_top1": best["holdout_group_top1"],
        "init_holdout_loss": progress["init"]["loss"], "init_group_top1": progress["init"]["group_top1"],
        "generalist_group_top1": progress.get("generalist", progress["init"])["group_top1"],
        "best_epoch": best_epoch, "epochs_trained": len(progress["epochs"]),
        "examples_seen": sum(r.get("examples", 0) for r in progress["epochs"]),
        "init_invariant_maxdiff": invariant,
    }
    cfg = job.settings
    summary = {
        "model": gen_meta["model"],
        "specialist": {
            "group_id": job.group_id, "classes": list(job.classes), "names": list(job.names),
            "size": len(job.classes), "order": "group classes as listed, then the dustbin",
            "dustbin_index": len(job.classes), "finetune": cfg.finetune, "last_n": cfg.last_n,
            "train_out_rows": cfg.reinit_blocks > 0, "reinit_blocks": cfg.reinit_blocks,
        },
        "pi_m": pi_m, "in_group_fraction": sampler.in_group_fraction,
        "prior_correction": corrected.prior_correction,
        "metrics": metrics, "resumed_from_epochs": [r["from_epoch"] for r in progress["resumes"]],
        "history": progress["epochs"], "mlflow_run_id": job.mlflow_run_id,
    }
    save_model(job.dir / MODEL, corrected, summary)
    checkpoints.clear()  # done: model.json now marks the group finished
    return summary


@functools.lru_cache(maxsize=4)
def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _log(job: SpecialistJob, metrics: dict[str, float], step: int) -> None:
    """Per-epoch metrics into the specialist's MLflow child run (made by the driver)."""
    if not (job.tracking_uri and job.mlflow_run_id):
        return
    from mlflow.entities import Metric

    if job.mlflow_run_id.startswith("offline-"):  # the server was away when the run was opened
        return
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    try:
        _client(job.tracking_uri).log_batch(job.mlflow_run_id, metrics=batch)
    except Exception as exc:  # noqa: BLE001 - tracking must never stop training; progress.json has them
        print(f"warning: specialist {job.group_id} epoch {step}: MLflow logging failed "
              f"({type(exc).__name__}); the epoch's metrics stay in {job.dir / PROGRESS}", flush=True)
