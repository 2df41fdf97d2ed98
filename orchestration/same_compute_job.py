"""The same-compute baseline: the generalist trained on for as many extra training examples as all
specialists together saw. A gain of the ensemble over the generalist that this model also makes is
extra training, not specialisation.

``specialists.same_compute_recipe`` says how the extra examples are spent: ``generalist`` (the
default) continues the generalist's own recipe (its optimizer and learning rate, its batch size
and augmentation) with a warmup and a cosine schedule over the budget; ``specialists`` fine-tunes
with the specialists' recipe. Either way the whole budget is trained (a restart at the
generalist's rate gets worse before it gets better) and the epoch with the best holdout top-1,
the figure the ensemble is compared on, is kept; epoch 0 (the generalist itself) counts, so the
baseline is never below the generalist on the holdout split. What one Ray task does (no Ray in here)::

    RUN/specialists/same_compute/checkpoints/     epoch snapshots (resumable)
    RUN/specialists/same_compute/model.*          the fine-tuned generalist (best holdout epoch)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from generalist.data.augment import AugmentSpec
from generalist.data.loader import loader
from generalist.data.source import ExampleSource
from generalist.train import (
    EarlyStopping,
    evaluate,
    mixed_precision,
    plateau_epoch_end,
    set_seed,
    train_one_epoch,
)
from orchestration.artifacts import CHECKPOINTS, MODEL, load_generalist
from orchestration.builders import optimizer_and_schedule
from orchestration.checkpoints import Checkpointer, CheckpointError, read_metadata, save_model
from orchestration.config import OptimizerConfig, SpecialistsConfig
from orchestration.data_access import SourceDescriptor, open_descriptor


@dataclass(frozen=True)
class SameComputeJob:
    """Everything the worker needs besides the data (picklable; paths on shared storage)."""

    run_dir: str
    out_dir: str
    budget: int                  # training examples: what all specialists together saw
    seed: int
    settings: SpecialistsConfig  # eval batch size, GPUs (and the recipe when recipe="specialists")
    optimizer: OptimizerConfig   # the recipe's optimizer and schedule
    batch_size: int
    recipe: str = "generalist"
    augment: AugmentSpec = AugmentSpec()
    threads: int = 1
    cpu_bf16: bool = False       # run.cpu_bf16, as the specialists train

    @property
    def dir(self) -> Path:
        return Path(self.out_dir)


def is_finished(job: SameComputeJob) -> bool:
    """True when the fine-tuned model was written for exactly this budget and recipe."""
    try:
        meta = read_metadata(job.dir / MODEL)
    except CheckpointError:
        return False
    written = meta.get("same_compute", {})
    return (job.dir / f"{MODEL}.safetensors").exists() and written.get("budget") == job.budget \
        and written.get("recipe", "specialists") == job.recipe


def train_same_compute(job: SameComputeJob, data: SourceDescriptor) -> dict[str, Any]:
    """Fine-tune the run's generalist on all classes for at most ``job.budget`` examples; returns
    the summary written to ``model.json``. ``data``: the descriptor of the train and holdout
    splits (:func:`orchestration.data_access.source_descriptor`), as for the specialists."""
    source = open_descriptor(data)
    cfg = job.settings
    torch.set_num_threads(max(1, job.threads))
    device = torch.device("cuda" if cfg.gpus_per_specialist > 0 and torch.cuda.is_available() else "cpu")
    model, meta = load_generalist(job.run_dir)
    set_seed(job.seed)
    model = model.to(device)
    n_train = source.size("train")
    steps_per_epoch = math.ceil(n_train / job.batch_size)
    epochs = max(1, math.ceil(job.budget / (steps_per_epoch * job.batch_size)))
    optimizer, scheduler = optimizer_and_schedule(model, job.optimizer, steps_per_epoch=steps_per_epoch,
                                                  epochs=epochs)
    stopper = EarlyStopping(patience=epochs + 1, mode="max")   # the whole budget; keeps the best top-1
    stateful = {"optimizer": optimizer, "scheduler": scheduler, "early_stopping": stopper}
    checkpoints = Checkpointer(job.dir / CHECKPOINTS)
    start = _resume(checkpoints, model, stateful)
    if start == 0:
        stopper.step(_holdout(model, source, cfg, device)["top1"], 0)
        checkpoints.save(0, model, stateful, best=True)
    for epoch in range(start, epochs):
        batches = _limited(source, job, epoch, device)
        train_one_epoch(model, batches, optimizer, scheduler, epoch=epoch, device=device,
                        amp=mixed_precision(device, cuda=False, cpu_bf16=job.cpu_bf16))
        holdout = _holdout(model, source, cfg, device)
        plateau_epoch_end(scheduler, holdout["loss"])
        improved = stopper.improves(holdout["top1"])
        stopper.step(holdout["top1"], epoch + 1)
        checkpoints.save(epoch + 1, model, stateful, best=improved)
    return _finish(job, checkpoints, model, meta, stopper, epochs, n_train)


def _limited(source: ExampleSource, job: SameComputeJob, epoch: int, device) -> Any:
    """One shuffled, augmented pass over the training split, cut where the budget runs out."""
    left = job.budget - epoch * math.ceil(source.size("train") / job.batch_size) * job.batch_size
    batches = loader(source, "train", batch_size=job.batch_size, shuffle=True, seed=job.seed, epoch=epoch,
                     augment=job.augment, device=device)
    for i, batch in enumerate(batches):
        if i * job.batch_size >= left:
            return
        yield batch


@torch.no_grad()
def _holdout(model, source: ExampleSource, cfg: SpecialistsConfig, device) -> dict[str, float]:
    batches = loader(source, "holdout", batch_size=cfg.eval_batch_size, shuffle=False, device=device)
    return {k: float(v) for k, v in evaluate(model, batches, device=device).items()}


def _resume(checkpoints: Checkpointer, model, stateful) -> int:
    try:
        snapshot = checkpoints.resume(model, stateful)
    except CheckpointError:
        checkpoints.clear()
        return 0
    return 0 if snapshot is None else snapshot.epoch


def _finish(job, checkpoints: Checkpointer, model, meta, stopper, epochs: int, n_train: int) -> dict[str, Any]:
    best_epoch = checkpoints.load_best(model)
    trained = checkpoints.latest_epoch()
    seen = min(job.budget, trained * math.ceil(n_train / job.batch_size) * job.batch_size)
    summary = {
        "model": meta["model"], "class_names": meta["class_names"],
        "same_compute": {"budget": job.budget, "recipe": job.recipe, "lr": job.optimizer.lr,
                         "examples_seen": seen, "best_epoch": best_epoch, "epochs_trained": trained,
                         "epochs_planned": epochs, "best_holdout_top1": stopper.best},
    }
    save_model(job.dir / MODEL, model.cpu(), summary)
    checkpoints.clear()
    return summary
