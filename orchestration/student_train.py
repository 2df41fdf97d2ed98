"""The distill stage's training loop for one student row, in the driver or as one Ray Train rank.

A :class:`Row` says how its student is taught. :func:`train_row` builds the student and its
objective (the run's seed first, so every row starts from the same weights and batch order),
resumes from the row's last epoch checkpoint and trains ``distill.epochs`` epochs. Told
:data:`orchestration.ray_train.SINGLE` it is the loop the driver always ran. As rank ``r`` of
``w`` (:mod:`orchestration.ray_train`, :func:`train_on_workers`) the student, and the objective
when it has learnable parts (hint regressors, connectors), are DDP modules; each rank trains
on its ``batch_size / w`` part of every global batch, with the examples' ids kept for cached
targets; rank 0's BatchNorm statistics are broadcast after every epoch, rank 0 evaluates the
holdout split, writes the row's checkpoints and logs the epoch to the stage's MLflow run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from distill.train import (
    DistillEpochResult,
    DistillObjective,
    TeacherFn,
    augmented_indexed,
    build_objective,
    distill_one_epoch,
    evaluate_batches,
    prepare_objective,
    source_indexed_batches,
)
from generalist.data.loader import augment_seed, loader
from generalist.train import mixed_precision, set_seed
from orchestration.artifacts import CHECKPOINTS
from orchestration.builders import augment_spec, optimizer_and_schedule
from orchestration.checkpoints import Checkpointer, CheckpointError, build_model, load_snapshot
from orchestration.pipeline import StageContext, step_progress
from orchestration.ray_train import STORAGE, Parallel, RayTrainError, fit, stage_payload


@dataclass(frozen=True)
class Row:
    """One student of the comparison: how it is taught and where it is saved."""

    name: str
    teacher: str                        # shown in the results table
    alpha: float
    teach: TeacherFn | None
    extra_losses: bool
    folder: str                         # relative to the stage dir; "" for the main student


def build_trained(ctx: StageContext, row: Row, spec: dict[str, Any], pairs: dict,
                  shapes: tuple) -> nn.ModuleDict:
    """The row's student and objective (what its checkpoints hold), on ``ctx.device``."""
    cfg = ctx.config.distill
    student = build_model(spec).to(ctx.device)
    losses = dict(cfg.losses) if row.extra_losses else {}
    objective = build_objective(temperature=cfg.temperature, alpha=row.alpha, losses=losses,
                                pairs={k: pairs[k] for k in losses}, student_shapes=shapes[0],
                                teacher_shapes=shapes[1], options=cfg.loss_options if losses else {},
                                num_examples=ctx.source().size("train")).to(ctx.device)
    return nn.ModuleDict({"student": student, "objective": objective})


def train_row(ctx: StageContext, row: Row, spec: dict[str, Any], pairs: dict, shapes: tuple,
              par: Parallel) -> nn.ModuleDict:
    """Train the row's student from its last checkpoint on, as rank ``par.rank`` (rank 0 saves
    the checkpoints); returns the trained student and objective."""
    cfg = ctx.config.distill
    set_seed(ctx.config.run.seed)       # every row starts from the same weights and batch order
    trained = build_trained(ctx, row, spec, pairs, shapes)
    steps = par.steps_per_epoch(ctx.source().size("train"), cfg.batch_size)
    optimizer, scheduler = optimizer_and_schedule(trained, cfg.optimizer, steps_per_epoch=steps,
                                                  epochs=cfg.epochs)
    checkpoints = Checkpointer(ctx.stage_dir / row.folder / CHECKPOINTS)
    stateful = {"optimizer": optimizer, "scheduler": scheduler}
    start = _resume(ctx, row, checkpoints, trained, stateful, par)
    if start == 0:
        _prepare(ctx, row, trained["objective"])
    nets = (par.wrap(trained["student"]), _wrap_learnable(par, trained["objective"]))
    for epoch in range(start, cfg.epochs):
        result = _train_epoch(ctx, row, trained, nets, optimizer, scheduler, epoch, steps, par)
        metrics = _end_epoch(ctx, row, trained, optimizer, result, par)
        snapshot = checkpoints.save(result.epoch + 1, trained, stateful,
                                    metadata={"model": spec, "row": row.name}) if par.is_main else None
        par.report(metrics, snapshot)
    return trained


def _prepare(ctx: StageContext, row: Row, objective: DistillObjective) -> None:
    """Terms that learn before the student does (factor transfer's paraphraser), on the whole
    training set: every rank fits the same one (same seed, same batches)."""
    cfg = ctx.config.distill
    fitted = prepare_objective(objective, lambda e: source_indexed_batches(
        ctx.source(), "train", batch_size=cfg.batch_size, shuffle=True, seed=ctx.config.run.seed,
        epoch=e, device=ctx.device), row.teach)
    for term, losses in fitted.items():
        ctx.console.print(f"  {row.name}: {term} paraphraser reconstruction MSE by epoch "
                          + " ".join(f"{v:.4f}" for v in losses))


def _wrap_learnable(par: Parallel, objective: DistillObjective) -> nn.Module:
    """The objective's DDP wrapper when it has learnable parts (their gradients are averaged
    over the ranks like the student's), else the objective itself."""
    learnable = any(p.requires_grad for p in objective.parameters())
    return par.wrap(objective) if learnable else objective


def student_amp(ctx: StageContext) -> bool:
    """Whether the students train in mixed precision (CUDA, or ``run.cpu_bf16`` on a CPU with native bf16)."""
    return mixed_precision(ctx.device, cpu_bf16=ctx.config.run.cpu_bf16)


def _train_epoch(ctx: StageContext, row: Row, trained: nn.ModuleDict, nets: tuple[nn.Module, nn.Module],
                 optimizer, scheduler, epoch: int, steps: int, par: Parallel) -> DistillEpochResult:
    """One epoch on this rank's part of every global batch, augmented before the teacher sees it."""
    cfg, source, seed = ctx.config.distill, ctx.source(), ctx.config.run.seed
    with step_progress(ctx, epoch, steps) as advance:
        batches = augmented_indexed(
            source_indexed_batches(source, "train", batch_size=cfg.batch_size, shuffle=True, seed=seed,
                                   epoch=epoch, device=ctx.device, rank=par.rank,
                                   world_size=par.world_size),
            augment_spec(ctx.config.data.augment, source, cfg.augment),
            seed=augment_seed(seed, par.rank, par.world_size), epoch=epoch)
        result = distill_one_epoch(
            nets[0], batches, optimizer, scheduler, objective=trained["objective"], teacher=row.teach,
            epoch=epoch, device=ctx.device, amp=student_amp(ctx), on_step=advance,
            features_of=trained["student"], objective_fn=nets[1])
    par.sync_buffers(trained)
    return result


def _end_epoch(ctx: StageContext, row: Row, trained: nn.ModuleDict, optimizer,
               result: DistillEpochResult, par: Parallel) -> dict[str, float]:
    """Evaluate on the holdout split (rank 0), log and print the epoch; returns its metrics."""
    cfg, student = ctx.config.distill, trained["student"]
    student.eval()
    holdout = par.from_main(lambda: evaluate_split(ctx, student, "holdout"))
    train = par.mean({"loss": result.loss, "accuracy": result.accuracy, **result.terms})
    terms = {k: train[k] for k in result.terms}
    metrics = {"train_loss": train["loss"], "train_accuracy": train["accuracy"], **terms,
               "holdout_top1": holdout["top1"], "examples_per_s": par.total(result.examples_per_s),
               "lr": optimizer.param_groups[0]["lr"]}
    if par.is_main:
        ctx.logger.log_metrics({f"{row.name}/{k}": v for k, v in metrics.items()}, step=result.epoch + 1)
    shown = "  ".join(f"{k} {v:.4f}" for k, v in terms.items())
    ctx.console.print(
        f"  {row.name} epoch {result.epoch + 1}/{cfg.epochs}  loss {metrics['train_loss']:.4f} ({shown})  "
        f"train acc {metrics['train_accuracy']:.3f}  holdout top1 {holdout['top1']:.3f}  "
        f"{metrics['examples_per_s']:,.0f} img/s  {result.seconds:.1f}s"
    )
    return metrics


def evaluate_split(ctx: StageContext, predict: Callable[[Tensor], Tensor], split: str) -> dict[str, float]:
    """Top-1/top-5 of ``predict`` (scores for a float batch) on ``split``, read through the source
    in ``distill.eval_batch_size`` batches, decoded by ``data.workers`` loader processes
    (:func:`distill.train.evaluate_batches`)."""
    batches = loader(ctx.source(), split, batch_size=ctx.config.distill.eval_batch_size, shuffle=False,
                     device=ctx.device, workers=ctx.config.data.workers)
    return evaluate_batches(predict, batches)


def _resume(ctx: StageContext, row: Row, checkpoints: Checkpointer, trained: nn.ModuleDict,
            stateful: dict[str, Any], par: Parallel) -> int:
    """Continue after the last finished epoch; a corrupt checkpoint restarts the row (rank 0
    clears it)."""
    snapshot, failed = checkpoints.resume_or_restart(trained, stateful, clear=par.is_main)
    if failed is not None:
        ctx.console.print(f"[yellow]warning[/] {row.name}: cannot resume ({failed}); training from scratch")
        return 0
    if snapshot is None:
        return 0
    ctx.console.print(f"  {row.name}: resuming after epoch {snapshot.epoch}")
    return snapshot.epoch


# ------------------------------------------------------------------------------ on Ray Train


def train_on_workers(ctx: StageContext, row: Row, spec: dict[str, Any], pairs: dict, shapes: tuple,
                     worker: Callable[[dict[str, Any]], None]) -> nn.Module:
    """``worker`` (:func:`train_row` as its rank) on Ray Train workers; returns the student of the
    row's last checkpoint, loaded in the driver."""
    trained = build_trained(ctx, row, spec, pairs, shapes)
    check_data_parallel(row, trained["objective"])
    cfg = ctx.config.ray.train
    ctx.console.print(f"  {row.name}: data-parallel on Ray Train, {cfg.workers} workers x "
                      f"{cfg.cpus_per_worker:g} CPUs{' + 1 GPU' if cfg.use_gpu else ''}, global batch "
                      f"{ctx.config.distill.batch_size}")
    row_dir = ctx.stage_dir / row.folder
    fit(worker, stage_payload(ctx, row=row.name, spec=spec), ctx.config.ray,
        storage=row_dir / STORAGE, name=f"distill_{row.name}")
    latest = Checkpointer(row_dir / CHECKPOINTS).latest_dir()
    if latest is None:
        raise CheckpointError(f"the Ray Train workers of {row.name} left no checkpoint in {row_dir / CHECKPOINTS}")
    load_snapshot(latest, trained, {})
    return trained["student"]


def check_data_parallel(row: Row, objective: DistillObjective) -> None:
    """RayTrainError for terms that keep per-example state (CRD's memory bank): each rank would
    update only its own examples' entries and the replicas would drift apart."""
    by_id = sorted(term for term, kind in objective.kinds.items() if kind.uses_ids)
    if by_id:
        raise RayTrainError(f"{row.name}: the extra loss terms {by_id} keep a memory bank by example id "
                            "that data-parallel ranks would update apart; train with ray.train.workers=1 "
                            "or drop them from distill.losses")
