"""Stage 1, the generalist: train a classifier on all classes, evaluate, checkpoint, resume.

Reads top to bottom: build the model from the config; with ``generalist.init`` load the user's
weights (:mod:`orchestration.generalist_init`: checked against the data, source and checksum
recorded) and either only evaluate them or fine-tune from them; resume from the last epoch
checkpoint if one fits, train with early stopping on the holdout loss, evaluate the best weights on the
test split, and write ``model.safetensors`` + ``model.json`` + ``metrics.json``. With
``ray.train.workers`` > 1 (or ``ray.train.use_gpu``) the same loop runs on Ray Train workers
(:mod:`orchestration.ray_train`), each reading its part of every global batch; the driver then
evaluates and writes the files as for one worker.
"""

from __future__ import annotations

from typing import Any

import ray

from generalist.data import DataError
from generalist.data.loader import loader
from generalist.models import summarize_model
from generalist.train import (
    EarlyStopping,
    evaluate,
    mixed_precision,
    plateau_epoch_end,
    set_seed,
    train_one_epoch,
)
from orchestration.artifacts import CHECKPOINTS, METRICS, MODEL
from orchestration.builders import augment_spec, optimizer_and_schedule, precision_note
from orchestration.checkpoints import (
    Checkpointer,
    CheckpointError,
    build_model,
    load_snapshot,
    save_model,
)
from orchestration.files import write_json
from orchestration.generalist_init import InitWeights, check_fits, init_identity, read_init
from orchestration.pipeline import Stage, StageContext, StageResult, step_progress
from orchestration.ray_train import (
    SINGLE,
    STORAGE,
    Parallel,
    fit,
    on_ray_train,
    stage_payload,
    worker_context,
)
from orchestration.tracking import resolve_tracking_uri

NAME = "generalist"


def model_spec(ctx: StageContext) -> dict[str, Any]:
    cfg, source = ctx.config.generalist, ctx.source()
    channels, height, _ = source.image_shape
    return {
        "name": cfg.model,
        "num_classes": source.num_classes,
        "in_channels": channels,
        "image_size": height,
        "width": cfg.width,
        "depth": cfg.depth,
    }


def check_splits(source) -> None:
    """Every split must hold examples: holdout drives early stopping and clustering."""
    for split in ("train", "holdout", "test"):
        if source.size(split) == 0:
            raise DataError(
                f"the {split} split is empty ({source.name}); early stopping and clustering need "
                f"held-out examples and evaluation needs a test split: raise "
                f"data.options.{split}_per_class (built-in sets) or the {split} fraction"
            )


def run(ctx: StageContext) -> StageResult:
    cfg, source = ctx.config.generalist, ctx.source()
    check_splits(source)
    set_seed(ctx.config.run.seed)
    spec = model_spec(ctx)
    model = build_model(spec).to(ctx.device)
    summary = summarize_model(model, source.image_shape, device=str(ctx.device))
    ctx.console.print(
        f"  model {cfg.model} width={cfg.width} depth={cfg.depth}: {summary.params:,} parameters, "
        f"{summary.latency_ms:.3f} ms/example; data {source.name}: {source.num_classes} classes, "
        f"{source.size('train'):,} train / {source.size('holdout'):,} holdout / {source.size('test'):,} test"
    )
    ctx.console.print(f"  training in {precision_note(ctx.device, _amp(ctx), ctx.config.run.cpu_bf16)}")
    init = _bring_your_own(ctx, model, spec) if cfg.init else None
    if init is not None and cfg.init_mode == "evaluate":
        return _write(ctx, model, spec, summary, {"epochs_trained": 0, "early_stopped": False,
                                                  "still_improving": False, "train_examples_seen": 0}, 0, init)
    checkpoints = Checkpointer(ctx.stage_dir / CHECKPOINTS)
    if on_ray_train(ctx.config.ray.train):
        stopper = _train_on_workers(ctx, model, spec, checkpoints)
    else:
        stopper = train(ctx, model, spec, SINGLE)
    convergence = _convergence(ctx, stopper, checkpoints.latest_epoch())
    return _finish(ctx, checkpoints, spec, summary, convergence, init)


def train(ctx: StageContext, model, spec: dict[str, Any], par: Parallel) -> EarlyStopping:
    """Train ``model`` with early stopping from the last epoch snapshot on, as rank ``par.rank``
    (rank 0 saves the snapshots), then, with ``generalist.clean_epochs``, go on from the best
    weights without augmentation until the holdout loss stops improving again; returns the
    early-stopping state."""
    cfg = ctx.config.generalist
    steps_per_epoch = par.steps_per_epoch(ctx.source().size("train"), cfg.batch_size)
    optimizer, scheduler = optimizer_and_schedule(model, cfg.optimizer, steps_per_epoch=steps_per_epoch,
                                                  epochs=cfg.epochs)
    stopper = EarlyStopping(patience=cfg.patience)
    checkpoints = Checkpointer(ctx.stage_dir / CHECKPOINTS)
    stateful = {"optimizer": optimizer, "scheduler": scheduler, "early_stopping": stopper}
    clean = CleanPhase()
    augmented = _augmented(ctx)
    with_clean_phase = _has_clean_phase(ctx)
    if with_clean_phase:
        stateful["clean_phase"] = clean
    epoch = _resume(ctx, checkpoints, model, stateful, steps_per_epoch, par)
    net = par.wrap(model)

    while not clean.ended(stopper, epoch, cfg):
        if not clean.on and (stopper.should_stop or epoch >= cfg.epochs):
            if not with_clean_phase:
                break
            _begin_clean_phase(ctx, checkpoints, model, optimizer, scheduler, stopper, clean, epoch, par)
        stop, metrics = _train_epoch(ctx, net, model, optimizer, scheduler, stopper, epoch, steps_per_epoch,
                                     par, augment=augmented and not clean.on, clean=clean.on)
        epoch += 1
        snapshot = checkpoints.save(epoch, model, stateful, metadata={"model": spec},
                                    best=stopper.best_epoch == epoch) if par.is_main else None
        par.report(metrics, snapshot)
        if stop:
            what = "without augmentation " if clean.on else ""
            ctx.console.print(f"  early stop after epoch {epoch}: holdout loss {what}did not improve")
    return stopper


def _augmented(ctx) -> bool:
    return augment_spec(ctx.config.data.augment, ctx.source(), ctx.config.generalist.augment).kind != "none"


def _has_clean_phase(ctx) -> bool:
    """Whether training goes on without augmentation after early stopping (then it ends only by
    early stopping or at ``generalist.clean_epochs``)."""
    return bool(ctx.config.generalist.clean_epochs) and _augmented(ctx)


class CleanPhase:
    """The epochs after early stopping that train without augmentation (``generalist.clean_epochs``):
    the epoch they began after, or None before; kept in the epoch snapshots."""

    def __init__(self) -> None:
        self.began_after: int | None = None

    @property
    def on(self) -> bool:
        return self.began_after is not None

    def ended(self, stopper: EarlyStopping, epoch: int, cfg) -> bool:
        """The clean phase ran and stopped: early, or after ``cfg.clean_epochs`` epochs."""
        return self.on and (stopper.should_stop or epoch >= self.began_after + cfg.clean_epochs)

    def state_dict(self) -> dict[str, Any]:
        return {"began_after": self.began_after}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.began_after = None if state["began_after"] is None else int(state["began_after"])


def _begin_clean_phase(ctx, checkpoints: Checkpointer, model, optimizer, scheduler, stopper: EarlyStopping,
                       clean: CleanPhase, epoch: int, par: Parallel) -> None:
    """Back to the best snapshot's weights, optimiser and schedule; early stopping keeps its best
    holdout loss, so a clean epoch becomes the best only when it beats the augmented phase."""
    par.barrier()  # rank 0 has written the snapshot every rank now reads
    best = checkpoints.best_dir()
    load_snapshot(best, model, {"optimizer": optimizer, "scheduler": scheduler})
    stopper.num_bad_epochs = 0
    clean.began_after = epoch
    ctx.console.print(f"  then up to {ctx.config.generalist.clean_epochs} epochs without augmentation from the "
                      f"best weights (epoch {stopper.best_epoch})")


def _train_on_workers(ctx: StageContext, model, spec: dict[str, Any], checkpoints: Checkpointer) -> EarlyStopping:
    """:func:`train` on Ray Train workers, all starting from ``model``'s weights; returns the
    early-stopping state of the last epoch snapshot."""
    cfg = ctx.config.ray.train
    ctx.console.print(f"  data-parallel on Ray Train: {cfg.workers} workers x {cfg.cpus_per_worker:g} CPUs"
                      f"{' + 1 GPU' if cfg.use_gpu else ''}, global batch {ctx.config.generalist.batch_size}")
    initial = ray.put({k: v.detach().cpu() for k, v in model.state_dict().items()})
    fit(train_worker, stage_payload(ctx, spec=spec, initial=initial), ctx.config.ray,
        storage=ctx.stage_dir / STORAGE, name=NAME)
    stopper = EarlyStopping(patience=ctx.config.generalist.patience)
    load_snapshot(checkpoints.latest_dir(), build_model(spec), {"early_stopping": stopper})
    return stopper


def train_worker(payload: dict[str, Any]) -> None:
    """One Ray Train worker of the generalist: :func:`train` as its rank, then a check that every
    rank holds the same weights (their sha256 is tagged on the stage's MLflow run)."""
    ctx, par = worker_context(payload)
    set_seed(ctx.config.run.seed)
    model = build_model(payload["spec"]).to(ctx.device)
    model.load_state_dict(ray.get(payload["initial"]))
    train(ctx, model, payload["spec"], par)
    check_replicas(ctx, par, model)


def check_replicas(ctx: StageContext, par: Parallel, model) -> None:
    """RuntimeError when the ranks' weights differ after training; rank 0 tags their sha256."""
    digests = par.checksums(model)
    if par.is_main:
        ctx.logger.set_tags({"specdistill.ray_train.weights_sha256": ",".join(digests)})
    if len(set(digests)) > 1:
        raise RuntimeError(f"the {par.world_size} data-parallel replicas hold different weights after "
                           f"training (sha256 by rank: {digests}); DDP did not keep them in step")


def _bring_your_own(ctx: StageContext, model, spec: dict[str, Any]) -> InitWeights:
    """Load ``generalist.init`` into ``model`` after checking it fits the data; record its source."""
    cfg = ctx.config.generalist
    weights = read_init(cfg.init, _tracking_uri(ctx))
    check_fits(weights, model.cpu(), spec, list(ctx.source().class_names))
    model.to(ctx.device)
    ctx.logger.set_tags({"specdistill.generalist_source": weights.source,
                         "specdistill.generalist_sha256": weights.sha256})
    what = "evaluated as it is, no training" if cfg.init_mode == "evaluate" else "fine-tuned from there"
    ctx.console.print(f"  weights from {weights.resolved} (sha256 {weights.sha256[:16]}): {what}")
    return weights


def _tracking_uri(ctx: StageContext) -> str:
    return ctx.tracker.uri if ctx.tracker else resolve_tracking_uri(ctx.config.tracking.uri)


def init_input(config) -> dict[str, str]:
    """The brought weights' identity as an input of the stage: other weights re-run it."""
    cfg = config.generalist
    if not cfg.init:
        return {}
    return {"init": init_identity(cfg.init, resolve_tracking_uri(config.tracking.uri)), "init_mode": cfg.init_mode}


def _convergence(ctx, stopper: EarlyStopping, epochs_trained: int) -> dict[str, Any]:
    """Whether training ended by early stopping or at the epoch limit with the holdout loss
    still falling (the best epoch was the last): an under-trained generalist makes any
    ensemble look good, so the report says so in words."""
    cfg = ctx.config.generalist
    early = stopper.should_stop
    still_falling = not early and stopper.best_epoch >= epochs_trained
    # with a clean phase the loop ends only by early stopping or at the clean phase's own limit
    limit = f"generalist.clean_epochs={cfg.clean_epochs}" if _has_clean_phase(ctx) else f"generalist.epochs={cfg.epochs}"
    record = {"early_stopped": early, "epochs_trained": epochs_trained,
              "still_improving": still_falling, "epoch_limit": limit,
              "train_examples_seen": epochs_trained * ctx.source().size("train")}
    if still_falling:
        ctx.console.print(
            f"  [yellow]not converged[/]: the generalist stopped at the epoch limit ({limit}) while its "
            f"holdout loss was still falling; raise {limit.split('=')[0]}, or every gain the specialists "
            "show may be extra training")
    return record


def _train_epoch(ctx, net, model, optimizer, scheduler, stopper, epoch, steps_per_epoch,
                 par: Parallel, *, augment: bool, clean: bool = False) -> tuple[bool, dict[str, float]]:
    """One epoch of ``net`` (``model``, or its DDP wrapper) on this rank's part of every batch,
    then the holdout loss on rank 0, which every rank's early stopping and plateau see."""
    cfg, source, device = ctx.config.generalist, ctx.source(), ctx.device
    batches = loader(source, "train", batch_size=cfg.batch_size, shuffle=True,
                     seed=ctx.config.run.seed, epoch=epoch, rank=par.rank, world_size=par.world_size,
                     device=device, augment=augment_spec(ctx.config.data.augment, source, augment),
                     workers=ctx.config.data.workers)
    with step_progress(ctx, epoch, steps_per_epoch) as advance:
        result = train_one_epoch(
            net, batches, optimizer, scheduler, epoch=epoch, device=device,
            label_smoothing=cfg.label_smoothing, amp=_amp(ctx),
            on_step=advance,
        )
    par.sync_buffers(model)
    holdout = par.from_main(lambda: evaluate(model, _eval_batches(ctx, "holdout"), device=device))
    plateau_epoch_end(scheduler, holdout["loss"])
    stop = stopper.step(holdout["loss"], epoch + 1)
    train_mean = par.mean({"loss": result.loss, "accuracy": result.accuracy})
    metrics = {
        "train_loss": train_mean["loss"],
        "train_accuracy": train_mean["accuracy"],
        "holdout_loss": holdout["loss"],
        "holdout_top1": holdout["top1"],
        "examples_per_s": par.total(result.examples_per_s),
        "lr": optimizer.param_groups[0]["lr"],
    }
    if par.is_main:
        ctx.logger.log_metrics(metrics, step=epoch + 1)
    ctx.console.print(
        f"  epoch {epoch + 1}{' (no augmentation)' if clean else f'/{cfg.epochs}'}  loss "
        f"{metrics['train_loss']:.4f}  train acc "
        f"{metrics['train_accuracy']:.3f}  holdout loss {holdout['loss']:.4f}  holdout top1 "
        f"{holdout['top1']:.3f}  {metrics['examples_per_s']:,.0f} img/s  {result.seconds:.1f}s"
    )
    return stop, metrics


def _resume(ctx, checkpoints: Checkpointer, model, stateful, steps_per_epoch: int,
            par: Parallel) -> int:
    """Continue from the last epoch snapshot; a corrupt one is reported and training restarts
    (rank 0 clears it)."""
    try:
        snapshot = checkpoints.resume(model, stateful)
        if snapshot is not None:
            checkpoints.load_best(build_model(model_spec(ctx)))  # the best snapshot must be readable too
    except CheckpointError as exc:
        ctx.console.print(f"[yellow]warning[/] cannot resume ({exc}); training from scratch")
        if par.is_main:
            checkpoints.clear()
        set_seed(ctx.config.run.seed)
        model.load_state_dict(build_model(model_spec(ctx)).state_dict())
        fresh = _fresh_state(ctx, model, steps_per_epoch)
        for name, obj in stateful.items():
            obj.load_state_dict(fresh[name].state_dict())
        return 0
    if snapshot is None:
        return 0
    ctx.console.print(f"  resuming after epoch {snapshot.epoch} from {checkpoints.latest_dir()}")
    return snapshot.epoch


def _fresh_state(ctx, model, steps_per_epoch: int) -> dict[str, Any]:
    """Optimizer, schedule, early stopping and clean phase as a fresh start has them."""
    cfg = ctx.config.generalist
    optimizer, scheduler = optimizer_and_schedule(model, cfg.optimizer, steps_per_epoch=steps_per_epoch,
                                                  epochs=cfg.epochs)
    return {"optimizer": optimizer, "scheduler": scheduler,
            "early_stopping": EarlyStopping(patience=cfg.patience), "clean_phase": CleanPhase()}


def _finish(ctx, checkpoints: Checkpointer, spec, summary, convergence: dict[str, Any],
            init: InitWeights | None) -> StageResult:
    model = build_model(spec)
    try:
        best_epoch = checkpoints.load_best(model)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; delete {ctx.stage_dir} to re-train the generalist") from None
    return _write(ctx, model, spec, summary, convergence, best_epoch, init)


def _write(ctx, model, spec, summary, convergence: dict[str, Any], best_epoch: int,
           init: InitWeights | None) -> StageResult:
    """Evaluate the final generalist on the test split and write its files."""
    source, device = ctx.source(), ctx.device
    model = model.to(device)
    test = evaluate(model, _eval_batches(ctx, "test"), device=device)
    metrics = {
        "test_top1": test["top1"],
        "test_top5": test["top5"],
        "test_loss": test["loss"],
        "params": summary.params,
        "latency_ms": summary.latency_ms,
        "best_epoch": best_epoch,
        **convergence,
    }
    metadata = {
        "model": spec,
        "class_names": list(source.class_names),
        "data": source.describe(),
        "config": ctx.config.generalist.model_dump(mode="json"),
        "metrics": metrics,
        **({"init": init.record()} if init else {}),
    }
    save_model(ctx.stage_dir / MODEL, model, metadata)
    write_json(ctx.stage_dir / METRICS, metrics)
    ctx.logger.log_metrics({k: float(v) for k, v in metrics.items() if k not in ("best_epoch", "epoch_limit")})
    if "epoch_limit" in metrics:
        ctx.logger.set_tags({"specdistill.generalist_epoch_limit": metrics["epoch_limit"]})
    ctx.logger.log_artifact(ctx.stage_dir / METRICS)
    ctx.logger.log_artifact(ctx.stage_dir / f"{MODEL}.json")
    ctx.console.print(
        f"  generalist test top1 {test['top1']:.4f}  top5 {test['top5']:.4f}  "
        f"params {summary.params:,}  (best epoch {best_epoch})"
    )
    outputs = [f"{MODEL}.safetensors", f"{MODEL}.json", METRICS]
    return StageResult(outputs=outputs, metrics=metrics, details={"data": source.describe()})


def _amp(ctx) -> bool:
    """Mixed precision for the generalist: ``generalist.amp`` on CUDA, and ``run.cpu_bf16`` on a CPU with native bf16."""
    return ctx.config.generalist.amp and mixed_precision(ctx.device, cpu_bf16=ctx.config.run.cpu_bf16)


def _eval_batches(ctx, split: str):
    return loader(ctx.source(), split, batch_size=ctx.config.generalist.eval_batch_size,
                  shuffle=False, device=ctx.device, workers=ctx.config.data.workers)


STAGE = Stage(
    name=NAME,
    config_keys=("data", "generalist", "run.seed", "run.cpu_bf16"),
    upstream=(),
    run=run,
    extra_inputs=init_input,
)
