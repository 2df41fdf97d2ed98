"""Stage 3, specialists: one model per confusable group, trained in parallel on Ray.

Reads top to bottom: check the clustering stage's groups against the generalist, plan one job
per group (finished groups are never retrained; when an edit or another change replaced the
stage's result, the specialists of the replaced result in ``RUN/history/specialists/`` whose
fingerprint, :func:`specialist_fingerprint`, still matches are kept), open an MLflow child run
of the pipeline run per specialist, connect to Ray and fail fast if no node can fit a
specialist's resources, run every job as a Ray task
(``orchestration.specialist_job.train_specialist``: resumable epochs, early stopping, prior
correction) while printing each specialist's epochs, then write the index ``specialists.json``.
Every task gets the same small descriptor of the data
(:func:`orchestration.data_access.source_descriptor`: in-memory arrays put in the object store
once, or a streaming source) and reads from it only its group's examples and the sampled rest.
Each group's folder holds its prior-corrected ``model.safetensors`` + ``model.json``; all of
them are outputs checksummed by the manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import statistics
from functools import partial
from pathlib import Path
from typing import Any

from orchestration.artifacts import (
    GROUP_DIR,
    HISTORY,
    MLFLOW_RECORD,
    MODEL,
    PROGRESS,
    SAME_COMPUTE_DIR,
    SPECIALISTS_INDEX,
    check_groups,
    generalist_metadata,
    load_groups,
)
from orchestration.builders import augment_spec
from orchestration.checkpoints import CheckpointError, read_metadata, verify_model_files
from orchestration.config import ConfigError, SpecialistsConfig, flatten, leaf_keys
from orchestration.config_sections import SAME_COMPUTE_RECIPES
from orchestration.data_access import source_descriptor
from orchestration.files import read_json, write_json
from orchestration.parallel import (
    TaskResources,
    WorkerLostError,
    cluster_summary,
    connect,
    run_tasks,
    unmet_request,
)
from orchestration.pipeline import Stage, StageContext, StageResult
from orchestration.same_compute_job import SameComputeJob, train_same_compute
from orchestration.same_compute_job import is_finished as same_compute_finished
from orchestration.specialist_job import SpecialistJob, is_finished, train_specialist
from orchestration.tracking import RunLogger

NAME = "specialists"
# Where and how fast specialists train, not what they learn: changing these never retrains.
EXECUTION_KEYS = ("cpus_per_specialist", "gpus_per_specialist", "max_concurrency", "max_retries")


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.config.specialists
    class_names = generalist_metadata(ctx.run_dir.path)["class_names"]
    groups = check_groups(load_groups(ctx.run_dir.path), class_names)
    jobs = [_plan(ctx, group) for group in groups]
    fingerprints = {job.group_id: specialist_fingerprint(ctx, job.classes) for job in jobs}
    finished = sum(is_finished(job) for job in jobs)
    reused = _reuse_earlier(ctx, jobs, fingerprints)
    todo = [job for job in jobs if not is_finished(job)]
    ctx.console.print(
        f"  {len(jobs)} specialists (finetune={cfg.finetune}, up to {cfg.epochs} epochs, "
        f"{'bf16 mixed precision on CPUs with native bf16' if ctx.config.run.cpu_bf16 else 'float32'}); "
        f"{finished} finished earlier, "
        + (f"{reused} kept from the result this one replaces (same classes and settings), " if reused else "")
        + f"{len(todo)} to train"
    )
    _close_interrupted_runs(ctx, [job for job in jobs if job not in todo])
    if todo:
        _train_in_parallel(ctx, todo)
    summaries = [read_metadata(job.dir / MODEL) for job in jobs]
    same = _same_compute(ctx, summaries) if cfg.same_compute else None
    return _finish(ctx, jobs, summaries, same, fingerprints, reused)


def specialist_fingerprint(ctx: StageContext, classes: tuple[int, ...]) -> str:
    """What a specialist is: its classes (in head order), the config keys the stage depends on and
    the generalist it starts from (whose digest covers the data). Not its group id."""
    blob = json.dumps([list(classes), ctx.config.section_hash(CONFIG_KEYS), ctx.upstream["generalist"].digest])
    return hashlib.sha256(blob.encode()).hexdigest()


def _reuse_earlier(ctx: StageContext, jobs: list[SpecialistJob], fingerprints: dict[int, str]) -> int:
    """Copy into their group folders the intact specialists of earlier results of this stage
    (``RUN/history/specialists/``, newest first) whose fingerprint matches; returns how many."""
    earlier = _earlier_specialists(ctx.run_dir.path / HISTORY / NAME)
    reused = 0
    for job in jobs:
        source = earlier.get(fingerprints[job.group_id])
        if source is None or is_finished(job):
            continue
        job.dir.mkdir(parents=True, exist_ok=True)
        for name in (f"{MODEL}.safetensors", MLFLOW_RECORD, f"{MODEL}.json"):  # model.json last: done
            if (source / name).exists():
                shutil.copy2(source / name, job.dir / name)
        reused += 1
    return reused


def _earlier_specialists(history: Path) -> dict[str, Path]:
    """Fingerprint -> group folder of every intact specialist in the stage's history."""
    found: dict[str, Path] = {}
    results = sorted(history.glob(f"*/{SPECIALISTS_INDEX}"), key=lambda p: p.stat().st_mtime)
    for index in results:                                  # newer results override older ones
        try:
            entries = read_json(index)["specialists"]
        except (ValueError, KeyError, TypeError):          # a damaged archive: nothing to take from it
            continue
        for entry in entries:
            group = index.parent / entry["dir"]
            if "fingerprint" in entry and _intact(group / MODEL):
                found[entry["fingerprint"]] = group
    return found


def _intact(stem: Path) -> bool:
    try:
        verify_model_files(stem)
    except CheckpointError:
        return False
    return True


def _plan(ctx: StageContext, group: dict[str, Any]) -> SpecialistJob:
    tracker = ctx.tracker
    return SpecialistJob(
        group_id=int(group["id"]),
        classes=tuple(int(c) for c in group["classes"]),
        names=tuple(group["names"]),
        group_dir=str((ctx.stage_dir / GROUP_DIR.format(int(group["id"]))).resolve()),
        run_dir=str(ctx.run_dir.path.resolve()),
        seed=ctx.config.run.seed * 100_003 + int(group["id"]),
        settings=ctx.config.specialists,
        augment=augment_spec(ctx.config.data.augment, ctx.source(), ctx.config.specialists.augment),
        tracking_uri=_absolute_uri(tracker.uri) if tracker else None,
        cpu_bf16=ctx.config.run.cpu_bf16,
    )


def _absolute_uri(uri: str) -> str:
    """Workers run in other folders (and nodes): make a relative sqlite/file store absolute."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if "://" not in uri:
        return str(Path(uri).resolve())
    return uri


# ----------------------------------------------------------------------------- training
def _train_in_parallel(ctx: StageContext, jobs: list[SpecialistJob]) -> None:
    cfg = ctx.config.specialists
    resources = TaskResources(cpus=cfg.cpus_per_specialist, gpus=cfg.gpus_per_specialist)
    where = connect(ctx.config.ray.address, local_num_cpus=ctx.config.ray.local_num_cpus)
    _require(resources)
    ctx.console.print(
        f"  on {where} [{cluster_summary()}]: {resources.cpus:g} CPU + {resources.gpus:g} GPU "
        f"per specialist, at most {cfg.max_concurrency or 'as many as fit'} at once"
    )
    # Largest groups first: the longest specialists start early instead of ending last alone.
    jobs = [_open_child_run(ctx, job) for job in sorted(jobs, key=lambda j: -len(j.classes))]
    printer = ProgressPrinter(ctx.console, jobs, cfg.epochs)
    failures = run_tasks(
        train_specialist, jobs, shared=source_descriptor(ctx.source(), ("train", "holdout")), resources=resources,
        max_concurrency=cfg.max_concurrency, max_retries=cfg.max_retries,
        on_result=partial(_on_result, ctx, printer), on_tick=printer.poll,
    )
    for failure in failures:
        _close_child_run(ctx, failure.item, None)
        ctx.console.print(f"  [red]failed[/] group {failure.item.group_id}: {failure.error}")
    if failures:
        first = failures[0]
        if isinstance(first.error, WorkerLostError):
            raise WorkerLostError(
                f"specialist group {first.item.group_id}: {first.error}; its checkpoint is kept: "
                "run the same command again to resume, or raise specialists.max_retries"
            )
        raise first.error


def _same_compute(ctx: StageContext, summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The generalist trained on for what all specialists saw (one Ray task), with the recipe
    ``specialists.same_compute_recipe`` names."""
    cfg, gen = ctx.config.specialists, ctx.config.generalist
    budget = int(sum(s["metrics"].get("examples_seen", 0) for s in summaries))
    threads = max(1, min(int(_cpus_available(ctx)), int(cfg.cpus_per_specialist * 2)))
    if cfg.same_compute_recipe == "generalist":
        optimizer, batch_size, augment = gen.optimizer.model_copy(update={"schedule": "cosine"}), \
            gen.batch_size, gen.augment
    else:
        optimizer, batch_size, augment = cfg.optimizer, cfg.batch_size, cfg.augment
    job = SameComputeJob(
        run_dir=str(ctx.run_dir.path.resolve()), out_dir=str((ctx.stage_dir / SAME_COMPUTE_DIR).resolve()),
        budget=budget, seed=ctx.config.run.seed * 100_003 + 99_991, settings=cfg, optimizer=optimizer,
        batch_size=batch_size, recipe=cfg.same_compute_recipe,
        augment=augment_spec(ctx.config.data.augment, ctx.source(), augment), threads=threads,
        cpu_bf16=ctx.config.run.cpu_bf16)
    if not same_compute_finished(job):
        recipe = SAME_COMPUTE_RECIPES[cfg.same_compute_recipe]
        ctx.console.print(f"  same-compute baseline: the generalist trained on for {budget:,} examples (what "
                          f"the {len(summaries)} specialists saw) with {recipe}, lr {optimizer.lr:g}")
        data = source_descriptor(ctx.source(), ("train", "holdout"))   # what the specialists read
        failures = run_tasks(train_same_compute, [job], shared=data,
                             resources=TaskResources(cpus=threads, gpus=cfg.gpus_per_specialist),
                             max_retries=cfg.max_retries)
        if failures:
            raise failures[0].error
    summary = read_metadata(job.dir / MODEL)["same_compute"]
    ctx.console.print(f"  same-compute baseline: {summary['examples_seen']:,} examples, best holdout top-1 "
                      f"{summary.get('best_holdout_top1', float('nan')):.4f} at epoch {summary['best_epoch']} of "
                      f"{summary['epochs_trained']} (epoch 0 = the generalist)")
    return summary


def _cpus_available(ctx: StageContext) -> float:
    import ray

    connect(ctx.config.ray.address, local_num_cpus=ctx.config.ray.local_num_cpus)  # no-op when connected
    return ray.cluster_resources().get("CPU", 1.0)


def _require(resources: TaskResources) -> None:
    reason = unmet_request(resources)
    if reason is not None:
        raise ConfigError(
            f"specialists cannot be scheduled: {reason}; lower specialists.gpus_per_specialist "
            "(0 on CPU machines) / specialists.cpus_per_specialist, or add nodes that have them"
        )


def _on_result(ctx: StageContext, printer: ProgressPrinter, job: SpecialistJob,
               summary: dict[str, Any]) -> None:
    printer.poll()
    printer.done(job, summary)
    _close_child_run(ctx, job, summary)


# ----------------------------------------------------------------------------- MLflow
def _open_child_run(ctx: StageContext, job: SpecialistJob) -> SpecialistJob:
    """The specialist's child run of the pipeline run: reused on retry and re-run, else new."""
    tracker = ctx.tracker
    if tracker is None or tracker.parent is None:
        return job
    tags = {
        "specdistill.stage": NAME,
        "specdistill.group_id": str(job.group_id), "specdistill.group_size": str(len(job.classes)),
        "specdistill.class_names": ", ".join(job.names)[:5000],
        "specdistill.class_ids": ",".join(map(str, job.classes))[:5000],
    }
    logger = tracker.open_child(f"specialist-{job.group_id:03d}", tags, job.dir / MLFLOW_RECORD)
    return dataclasses.replace(job, mlflow_run_id=logger.run_id)


def _close_interrupted_runs(ctx: StageContext, finished: list[SpecialistJob]) -> None:
    """A specialist that finished training just before the pipeline was killed has a model but an
    MLflow child run still RUNNING (the driver had not closed it yet): close it now, with its
    summary, so a resumed run leaves no dangling runs."""
    tracker = ctx.tracker
    if tracker is None or tracker.parent is None:
        return
    for job in finished:
        logger = tracker.running_child(job.dir / MLFLOW_RECORD)
        if logger is not None:
            _log_summary(logger, job, read_metadata(job.dir / MODEL))


def _close_child_run(ctx: StageContext, job: SpecialistJob, summary: dict[str, Any] | None) -> None:
    if not (ctx.tracker and job.mlflow_run_id):
        return
    logger = ctx.tracker.logger(job.mlflow_run_id)
    if summary is None:
        logger.finish("FAILED")
        return
    _log_summary(logger, job, summary)


def _log_summary(logger: RunLogger, job: SpecialistJob, summary: dict[str, Any]) -> None:
    logger.log_metrics({**summary["metrics"], "pi_m": summary["pi_m"],
                        "prior_correction": summary["prior_correction"]})
    logger.log_params(flatten(job.settings.model_dump(mode="json"), "specialists."))
    logger.log_artifact(job.dir / f"{MODEL}.json")
    logger.finish()


# ----------------------------------------------------------------------------- output
def _finish(ctx: StageContext, jobs: list[SpecialistJob], summaries: list[dict[str, Any]],
            same: dict[str, Any] | None, fingerprints: dict[int, str], reused: int) -> StageResult:
    entries = [{**_index_entry(job, s), "fingerprint": fingerprints[job.group_id]}
               for job, s in zip(jobs, summaries, strict=True)]
    write_json(ctx.stage_dir / SPECIALISTS_INDEX, {"finetune": ctx.config.specialists.finetune, "specialists": entries})
    ms = [s["metrics"] for s in summaries]
    metrics = {
        "n_specialists": len(jobs),
        "mean_group_top1": statistics.fmean(m["best_group_top1"] for m in ms),
        "mean_init_group_top1": statistics.fmean(m["init_group_top1"] for m in ms),
        "mean_generalist_group_top1": statistics.fmean(m.get("generalist_group_top1", m["init_group_top1"]) for m in ms),
        "mean_holdout_loss": statistics.fmean(m["best_holdout_loss"] for m in ms),
        "init_invariant_maxdiff": max(m["init_invariant_maxdiff"] for m in ms),
        "n_resumed": sum(bool(s["resumed_from_epochs"]) for s in summaries),
        "n_reused": reused,
        "examples_seen": sum(m.get("examples_seen", 0) for m in ms),
    }
    outputs = [SPECIALISTS_INDEX] + [f"{job.dir.name}/{MODEL}{ext}" for job in jobs for ext in (".safetensors", ".json")]
    if same is not None:
        metrics.update(same_compute_examples=same["examples_seen"], same_compute_best_epoch=same["best_epoch"])
        outputs += [f"{SAME_COMPUTE_DIR}/{MODEL}{ext}" for ext in (".safetensors", ".json")]
    ctx.logger.log_metrics(metrics)
    ctx.logger.log_artifact(ctx.stage_dir / SPECIALISTS_INDEX)
    ctx.console.print(
        f"  {len(jobs)} specialists: group top1 {metrics['mean_group_top1']:.3f} "
        f"(generalist {metrics['mean_generalist_group_top1']:.3f}) on their balanced holdouts; "
        f"init invariant max diff {metrics['init_invariant_maxdiff']:.1e}"
    )
    return StageResult(outputs=outputs, metrics=metrics)


def _index_entry(job: SpecialistJob, summary: dict[str, Any]) -> dict[str, Any]:
    return {
        "group_id": job.group_id, "dir": job.dir.name, "classes": list(job.classes),
        "names": list(job.names), "pi_m": summary["pi_m"],
        "prior_correction": summary["prior_correction"], "metrics": summary["metrics"],
        "resumed_from_epochs": summary["resumed_from_epochs"], "mlflow_run_id": summary["mlflow_run_id"],
    }


class ProgressPrinter:
    """Prints each specialist's new epochs, resumes and warnings from its ``progress.json``."""

    def __init__(self, console, jobs: list[SpecialistJob], epochs: int):
        self.console, self.epochs = console, epochs
        self.jobs = {job.group_id: job for job in jobs}
        self.seen = {job.group_id: self._counts(self._read(job) or {}) for job in jobs}

    @staticmethod
    def _read(job: SpecialistJob) -> dict[str, Any] | None:
        path = job.dir / PROGRESS
        return read_json(path) if path.exists() else None

    @staticmethod
    def _counts(progress: dict[str, Any]) -> tuple[int, int, int]:
        """Epochs, resumes and warnings already shown (those of an earlier invocation count)."""
        return tuple(len(progress.get(k, [])) for k in ("epochs", "resumes", "warnings"))

    def poll(self) -> None:
        for job in list(self.jobs.values()):
            progress = self._read(job)
            if progress is not None:
                self._print_new(job, progress)

    def _print_new(self, job: SpecialistJob, progress: dict[str, Any]) -> None:
        n_epochs, n_resumes, n_warnings = self.seen[job.group_id]
        for note in progress.get("warnings", [])[n_warnings:]:
            self.console.print(f"  [yellow]warning[/] group {job.group_id}: {note}")
        for resume in progress["resumes"][n_resumes:]:
            self.console.print(f"  group {job.group_id}: worker restarted, resumed from epoch "
                               f"{resume['from_epoch']} (pid {resume['pid']})")
        for r in progress["epochs"][n_epochs:]:
            self.console.print(
                f"  group {job.group_id:>3} ({len(job.classes)} classes: {' '.join(job.names[:6])}"
                f"{' ...' if len(job.names) > 6 else ''}) epoch {r['epoch']}/{self.epochs}  "
                f"loss {r['train_loss']:.4f}  holdout loss {r['holdout_loss']:.4f}  "
                f"group top1 {r['holdout_group_top1']:.3f}  {r['examples_per_s']:,.0f} img/s"
            )
        self.seen[job.group_id] = self._counts(progress)

    def done(self, job: SpecialistJob, summary: dict[str, Any]) -> None:
        m = summary["metrics"]
        self.console.print(
            f"  [green]done[/] group {job.group_id}: best epoch {m['best_epoch']}, group top1 "
            f"{m['best_group_top1']:.3f} (generalist {m.get('generalist_group_top1', m['init_group_top1']):.3f}), dustbin logit "
            f"{summary['prior_correction']:+.3f} (pi {summary['pi_m']:.4f})"
        )
        self.jobs.pop(job.group_id, None)


CONFIG_KEYS = ("run.seed", "run.cpu_bf16", "data.augment", *leaf_keys(SpecialistsConfig, NAME, exclude=EXECUTION_KEYS))
STAGE = Stage(
    name=NAME,
    config_keys=CONFIG_KEYS,
    upstream=("generalist", "clustering"),
    run=run,
)
