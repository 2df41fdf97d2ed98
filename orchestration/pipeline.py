"""The resumable pipeline: stages in order, each skipped when its manifest still matches.

A stage is a name, the config keys its result depends on, the upstream stages whose outputs
it reads, and a function ``run(ctx) -> StageResult``. Its fingerprint is the hash of those
config keys plus the digests of the upstream manifests, so changing a key re-runs exactly the
stages that depend on it (and everything downstream of them).
"""

from __future__ import annotations

import functools
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from orchestration.artifacts import ATTEMPT, CONFIG
from orchestration.config import Config
from orchestration.files import read_json, write_json
from orchestration.rundir import Manifest, RunDir
from orchestration.tracking import (
    PipelineTracker,
    RunLogger,
    check_reachable,
    resolve_tracking_uri,
)


@dataclass(frozen=True)
class StageResult:
    """What a stage returns: its output files (checksummed into the manifest; a re-run is skipped
    only while they are intact), metrics (into the manifest and MLflow) and details (manifest)."""

    outputs: list[str]                         # files relative to the stage dir
    metrics: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageContext:
    """Everything a stage's ``run`` gets: the validated config, the run directory and its own
    folder, its MLflow child run (``logger``), the console, the device, the data (loaded once per
    pipeline, lazily), the manifests of its upstream stages and the pipeline's tracker."""

    config: Config
    run_dir: RunDir
    stage_dir: Path
    logger: RunLogger
    console: Console
    device: torch.device
    load_data: Callable[[], Any]
    upstream: dict[str, Manifest]
    tracker: PipelineTracker | None = None      # parent run id and client, for per-item child runs

    def data(self):
        return self.load_data()


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: its name (also its folder in the run directory), the dotted config keys
    its result depends on, the upstream stages whose outputs it reads, and its ``run``."""

    name: str
    config_keys: tuple[str, ...]
    upstream: tuple[str, ...]
    run: Callable[[StageContext], StageResult]


@dataclass(frozen=True)
class PipelineOutcome:
    """What :func:`run_pipeline` did: the run directory, the MLflow parent run, every stage's
    manifest, and which stages ran and which were skipped."""

    run_dir: Path
    parent_run_id: str
    manifests: dict[str, Manifest]
    ran: list[str]
    skipped: list[str]


class step_progress:
    """A transient per-step progress bar for a training epoch on terminals; silent otherwise (logs
    get the stages' epoch lines). ``with step_progress(ctx, epoch, steps) as advance: advance(step, loss)``."""

    def __init__(self, ctx: StageContext, epoch: int, total: int):
        self.progress = Progress(
            TextColumn(f"  epoch {epoch + 1}"), BarColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
            TimeRemainingColumn(), console=ctx.console, transient=True,
            disable=not ctx.console.is_terminal,
        )
        self.task = self.progress.add_task("train", total=total, loss=float("nan"))

    def __enter__(self):
        self.progress.start()
        return lambda step, loss: self.progress.update(self.task, completed=step + 1, loss=loss)

    def __exit__(self, *exc):
        self.progress.stop()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but no CUDA device is visible; use run.device=cpu")
    return torch.device(name)


def stage_fingerprint(config: Config, stage: Stage, manifests: dict[str, Manifest]) -> tuple[str, dict[str, str]]:
    inputs = {name: manifests[name].digest for name in stage.upstream}
    return config.section_hash(stage.config_keys), inputs


def select_stages(stages: Sequence[Stage], only: str | None, start: str | None,
                  stop: str | None = None) -> set[str]:
    """Names of the stages to (re)consider: all, one (``only``), from ``start`` on, up to ``stop``."""
    names = [s.name for s in stages]
    for name in (only, start, stop):
        if name is not None and name not in names:
            raise ValueError(f"unknown stage {name!r}; stages are: {', '.join(names)}")
    if only:
        return {only}
    first = names.index(start) if start else 0
    last = names.index(stop) if stop else len(names) - 1
    if last < first:
        raise ValueError(f"--to {stop} comes before --from {start}; stages run in the order {', '.join(names)}")
    return set(names[first:last + 1])


def run_pipeline(
    config: Config,
    stages: Sequence[Stage],
    *,
    only: str | None = None,
    start: str | None = None,
    stop: str | None = None,
    console: Console | None = None,
) -> PipelineOutcome:
    console = console or Console()
    selected = select_stages(stages, only, start, stop)
    run_dir = RunDir(config.run.path)
    run_dir.ensure_writable()
    if config.run.num_threads:
        torch.set_num_threads(config.run.num_threads)
    device = resolve_device(config.run.device)
    uri = resolve_tracking_uri(config.tracking.uri)
    check_reachable(uri)
    (run_dir.path / CONFIG).write_text(config.to_yaml())

    tracker = PipelineTracker(uri, config.tracking.experiment, run_dir.path)
    parent = tracker.start_parent(config.run.name, config.section_hash(_run_keys(config)))
    parent.log_params(config.flat())
    parent.log_artifact(run_dir.path / CONFIG)
    console.print(f"[bold]specdistill[/] run dir {run_dir.path}  mlflow {uri}  parent run {parent.run_id}")

    load_data = functools.lru_cache(maxsize=1)(functools.partial(_load_data, config))
    manifests: dict[str, Manifest] = {}
    ran, skipped = [], []
    last = max(i for i, s in enumerate(stages) if s.name in selected)
    try:
        for stage in stages[: last + 1]:
            config_hash, inputs = stage_fingerprint(config, stage, manifests)
            reason = run_dir.is_complete(stage.name, config_hash, inputs)
            if start is not None and stage.name in selected:
                reason = f"--from {start}: re-run from scratch"
                shutil.rmtree(run_dir.path / stage.name, ignore_errors=True)
            if reason is None or stage.name not in selected:
                manifest = run_dir.read_manifest(stage.name)
                if manifest is None:
                    raise RuntimeError(
                        f"stage {stage.name} has not run yet; run it first "
                        f"(specdistill {stage.name} ...) or drop --only/--from"
                    )
                if reason is None:
                    console.print(f"[green]skip[/] {stage.name}: finished earlier, manifest matches")
                    if tracker.close_finished_stage(run_dir.path / stage.name, run_dir.manifest_path(stage.name)):
                        console.print(f"  closed the MLflow run of {stage.name}, left open when the "
                                      "pipeline stopped right after the stage finished")
                manifests[stage.name] = manifest
                skipped.append(stage.name)
                continue
            console.print(f"[bold cyan]stage[/] {stage.name} ({reason})")
            manifests[stage.name] = _run_stage(
                stage, config, run_dir, tracker, console, device, load_data, manifests, config_hash, inputs
            )
            ran.append(stage.name)
    except BaseException:
        parent.finish("FAILED")
        raise
    parent.finish()
    if tracker.flush():
        console.print("MLflow is back: the tracking calls buffered during the run were sent")
    return PipelineOutcome(run_dir.path, parent.run_id, manifests, ran, skipped)


def _run_keys(config: Config) -> list[str]:
    """Everything but tracking decides the identity of a pipeline run."""
    return [k for k in type(config).model_fields if k != "tracking"]


def _load_data(config: Config):
    from generalist.data import create_dataset

    return create_dataset(
        config.data.name, root=config.data.root, seed=config.run.seed, **config.data.options
    )


def _prepare_stage_dir(run_dir: RunDir, stage: str, config_hash: str, inputs: dict[str, str]) -> Path:
    """Keep partial work (checkpoints) only when it was made for the same config and inputs."""
    stage_dir = run_dir.stage_dir(stage)
    attempt = {"config_hash": config_hash, "inputs": inputs}
    path = stage_dir / ATTEMPT
    if path.exists() and read_json(path) != attempt:
        shutil.rmtree(stage_dir)
        stage_dir.mkdir(parents=True)
    run_dir.invalidate(stage)
    write_json(path, attempt)
    return stage_dir


def _run_stage(stage, config, run_dir, tracker, console, device, load_data, manifests, config_hash, inputs):
    stage_dir = _prepare_stage_dir(run_dir, stage.name, config_hash, inputs)
    started = time.perf_counter()
    with tracker.child(stage.name, stage_dir) as logger:
        logger.log_params({k: v for k, v in config.flat().items() if k.startswith(stage.config_keys)})
        ctx = StageContext(
            config=config,
            run_dir=run_dir,
            stage_dir=stage_dir,
            logger=logger,
            console=console,
            device=device,
            load_data=load_data,
            upstream={name: manifests[name] for name in stage.upstream},
            tracker=tracker,
        )
        result = stage.run(ctx)
        seconds = time.perf_counter() - started
        metrics = {**result.metrics, "stage_seconds": round(seconds, 3)}
        manifest = run_dir.write_manifest(
            stage.name,
            config_hash=config_hash,
            inputs=inputs,
            outputs=result.outputs,
            metrics=metrics,
            details={**result.details, "mlflow_run_id": logger.run_id},
        )
        logger.log_artifact(run_dir.manifest_path(stage.name))
    console.print(f"[green]done[/] {stage.name} in {seconds:.1f}s")
    return manifest
