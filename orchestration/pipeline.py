"""The resumable pipeline: stages in order, each skipped when its manifest still matches.

A stage is a name, the config keys its result depends on, the upstream stages whose outputs
it reads, and a function ``run(ctx) -> StageResult``. Its fingerprint is the hash of those
config keys plus its inputs: the digests of the upstream manifests (what their outputs say,
:attr:`orchestration.rundir.Manifest.digest`) and, for data on disk, the data's identity
(:mod:`orchestration.data_identity`). Changing a key or the data re-runs exactly the stages that
depend on it (and those downstream whose inputs then change); the finished results they replace
are set aside in ``RUN/history/`` (:mod:`orchestration.history`).

Input errors (an unknown data set or option, ``run.device=cuda`` without CUDA, missing data
files, an unreachable tracking server) stop a run before it writes a run directory or starts an
MLflow run.
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
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from generalist.data import DataError
from orchestration.artifacts import ATTEMPT, CONFIG, HISTORY, RUN_RECORD
from orchestration.config import UNHASHED_KEYS, Config, ConfigError, check_data_options, flatten
from orchestration.data_identity import data_fingerprint
from orchestration.files import read_json, write_json
from orchestration.history import archive_stage, config_changes, describe, stage_config
from orchestration.rundir import Manifest, ManifestError, RunDir
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
    _source: Any = field(default=None, init=False, repr=False)

    def data(self):
        return self.load_data()

    def source(self):
        """The data as an :class:`~generalist.data.source.ExampleSource` (batches by split):
        packed data and folder trees stream from storage (``PackedSource``, ``FolderSource``),
        every other data set is loaded once into memory (``InMemorySource``)."""
        if self._source is None:
            self._source = open_source(self.config, self.load_data)
        return self._source


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: its name (also its folder in the run directory), the dotted config keys
    its result depends on, the upstream stages whose outputs it reads, and its ``run``;
    ``extra_inputs`` adds the digests of files the config names (part of its fingerprint), and
    ``gate(config, run_dir, tracking_uri, experiment_id)`` returns a message when the pipeline
    must stop after the stage (a person has to act first)."""

    name: str
    config_keys: tuple[str, ...]
    upstream: tuple[str, ...]
    run: Callable[[StageContext], StageResult]
    extra_inputs: Callable[[Config], dict[str, str]] | None = None
    gate: Callable[[Config, Path, str, str], str | None] | None = None


@dataclass(frozen=True)
class PipelineOutcome:
    """What :func:`run_pipeline` did: the run directory, the MLflow parent run, every stage's
    manifest, which stages ran and which were skipped, and why it stopped early (a gate's message)."""

    run_dir: Path
    parent_run_id: str
    manifests: dict[str, Manifest]
    ran: list[str]
    skipped: list[str]
    waiting: str | None = None


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


class task_progress:
    """A transient progress bar for a long step on terminals; silent otherwise.
    ``with task_progress(ctx, "holdout pass", total) as advance: advance()`` (one unit each)."""

    def __init__(self, ctx: StageContext, label: str, total: int):
        self.progress = Progress(TextColumn(f"  {label}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                 TimeRemainingColumn(), console=ctx.console, transient=True,
                                 disable=not ctx.console.is_terminal)
        self.task = self.progress.add_task(label, total=total)

    def __enter__(self):
        self.progress.start()
        return lambda: self.progress.advance(self.task)

    def __exit__(self, *exc):
        self.progress.stop()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device=cuda but PyTorch sees no CUDA device (torch.cuda.is_available() "
                          "is False); use run.device=cpu or run.device=auto, or run where a GPU and a "
                          "CUDA build of PyTorch are installed")
    return torch.device(name)


def stage_fingerprint(config: Config, stage: Stage, manifests: dict[str, Manifest],
                      data: str | None = None) -> tuple[str, dict[str, str]]:
    """The stage's config hash and inputs: its upstream manifests' digests, and ``data`` (the
    identity of data on disk, :mod:`orchestration.data_identity`) when there is one."""
    inputs = {name: manifests[name].digest for name in stage.upstream}
    if data is not None:
        inputs["data"] = data
    if stage.extra_inputs is not None:
        inputs.update(stage.extra_inputs(config))
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


@dataclass
class _Pass:
    """One invocation walking the stages: what it needs and what it found so far."""

    config: Config
    selected: set[str]
    start: str | None
    run_dir: RunDir
    tracker: PipelineTracker
    console: Console
    device: torch.device
    load_data: Callable[[], Any]
    data: Callable[[], str | None]        # the data's identity (None: pinned by the config)
    previous: dict[str, Any]              # flat config of the previous invocation ({}: none)
    previous_parent: str | None           # its MLflow parent run
    manifests: dict[str, Manifest] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


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
    device, uri = resolve_device(config.run.device), resolve_tracking_uri(config.tracking.uri)
    check_data_options(config)           # input errors end here, before any file or MLflow run
    load_data = functools.lru_cache(maxsize=1)(functools.partial(_load_data, config))
    data = _data_identity(config, load_data)
    check_reachable(uri)
    run_dir = RunDir(config.run.path)
    run_dir.ensure_writable()
    if config.run.num_threads:
        torch.set_num_threads(config.run.num_threads)
    previous, previous_parent = _previous_invocation(run_dir)
    (run_dir.path / CONFIG).write_text(config.to_yaml())

    tracker = PipelineTracker(uri, config.tracking.experiment, run_dir.path)
    parent = tracker.start_parent(config.run.name, config.section_hash(_run_keys(config)))
    parent.log_params(config.flat())
    parent.log_artifact(run_dir.path / CONFIG)
    console.print(f"[bold]specdistill[/] run dir {run_dir.path}  mlflow {uri}  parent run {parent.run_id}")
    run = _Pass(config, selected, start, run_dir, tracker, console, device, load_data, data,
                previous, previous_parent)
    last = max(i for i, s in enumerate(stages) if s.name in selected)
    waiting = None
    try:
        _announce_changes(run, stages[: last + 1])
        for i, stage in enumerate(stages[: last + 1]):
            _visit(run, stage)
            waiting = _gate(run, stage) if i < last else None
            if waiting:
                console.print(f"[yellow]stopped[/] after {stage.name}: {waiting}")
                break
    except BaseException:
        parent.finish("FAILED")
        raise
    parent.finish()
    if tracker.flush():
        console.print("MLflow is back: the tracking calls buffered during the run were sent")
    return PipelineOutcome(run_dir.path, parent.run_id, run.manifests, run.ran, run.skipped, waiting)


def _gate(run: _Pass, stage: Stage) -> str | None:
    """The stage's gate message when the pipeline must wait after it, else None."""
    if stage.gate is None:
        return None
    return stage.gate(run.config, run.run_dir.path, run.tracker.uri, run.tracker.experiment_id)


def _data_identity(config: Config, load_data: Callable[[], Any]) -> Callable[[], str | None]:
    """The data's identity, taken now (a DataError naming the missing files ends the run before
    anything is written), or once the data is loaded when it is still to be downloaded."""
    try:
        digest = data_fingerprint(config)
    except DataError:
        if not config.data.options.get("download"):
            raise
        return functools.cache(lambda: (load_data(), data_fingerprint(config))[1])
    return lambda: digest


def _previous_invocation(run_dir: RunDir) -> tuple[dict[str, Any], str | None]:
    """Flat config and MLflow parent run of the last invocation in this run directory."""
    path, record = run_dir.path / CONFIG, run_dir.path / RUN_RECORD
    try:
        raw = yaml.safe_load(path.read_text()) if path.exists() else {}
        parent = read_json(record).get("mlflow_run_id") if record.exists() else None
    except (yaml.YAMLError, ValueError, AttributeError):   # damaged: nothing to compare with
        return {}, None
    return (flatten(raw) if isinstance(raw, dict) else {}), parent


def _announce_changes(run: _Pass, stages: Sequence[Stage]) -> None:
    """One line naming what changed since the last invocation and which finished stages re-run."""
    changes = config_changes(run.previous, run.config.flat()) if run.previous else []
    changes = [c for c in changes
               if c[0] not in (*UNHASHED_KEYS, *LOCATION_KEYS) and not c[0].startswith("tracking.")]
    if not changes:
        return
    rerun: list[str] = []
    for stage in stages:
        manifest = _readable_manifest(run.run_dir, stage.name)
        hash_changed = manifest is not None and manifest.config_hash != run.config.section_hash(stage.config_keys)
        if stage.name in run.selected and manifest is not None and (
                hash_changed or any(name in rerun for name in stage.upstream)):
            rerun.append(stage.name)
    where = (f"their finished outputs move to {run.run_dir.path / HISTORY}/<stage>/ "
             f"(run.keep_history={run.config.run.keep_history})" if run.config.run.keep_history
             else "their finished outputs are deleted (run.keep_history=0)")
    effect = f"re-runs {', '.join(rerun)}; {where}" if rerun else "no finished stage depends on it"
    run.console.print(f"[yellow]config changed[/] since the last run in {run.run_dir.path}: "
                      f"{describe(changes)}; {effect}")


# Where the run directory is (a different spelling of the same folder is no change); tracking.*
# says where the run is logged, not what it computes.
LOCATION_KEYS = ("run.dir", "run.root")


def _readable_manifest(run_dir: RunDir, stage: str) -> Manifest | None:
    try:
        return run_dir.read_manifest(stage)
    except ManifestError:
        return None


def _visit(run: _Pass, stage: Stage) -> None:
    """Skip the stage when it finished with this config and these inputs, else (re-)run it."""
    config_hash, inputs = stage_fingerprint(run.config, stage, run.manifests, run.data())
    reason = run.run_dir.is_complete(stage.name, config_hash, inputs)
    if run.start is not None and stage.name in run.selected:
        reason = f"--from {run.start}: re-run from scratch"
        shutil.rmtree(run.run_dir.path / stage.name, ignore_errors=True)
    if reason is None or stage.name not in run.selected:
        run.manifests[stage.name] = _keep(run, stage, reason)
        run.skipped.append(stage.name)
        return
    run.console.print(f"[bold cyan]stage[/] {stage.name} ({reason})")
    if reason in REPLACED:
        _set_aside(run, stage, reason, inputs)
    run.manifests[stage.name] = _run_stage(run, stage, config_hash, inputs)
    run.ran.append(stage.name)


# Reasons a finished result is replaced by another (its folder is set aside first); any other
# reason (no manifest, damaged outputs) re-runs the stage in place, from its last good state.
REPLACED = ("config changed", "inputs changed", "data changed")


def _keep(run: _Pass, stage: Stage, reason: str | None) -> Manifest:
    """The finished stage's manifest (skipped, or not selected this time)."""
    try:
        manifest = run.run_dir.read_manifest(stage.name)
    except ManifestError as exc:
        raise ManifestError(f"{exc}; the {stage.name} stage must run again: specdistill run CONFIG "
                            f"run.dir={run.run_dir.path} (without --only/--from past it)") from None
    if manifest is None:
        raise RuntimeError(f"stage {stage.name} has not run yet; run it first "
                           f"(specdistill {stage.name} ...) or drop --only/--from")
    if reason is None:
        run.console.print(f"[green]skip[/] {stage.name}: finished earlier, manifest matches")
        if run.tracker.close_finished_stage(run.run_dir.path / stage.name, run.run_dir.manifest_path(stage.name)):
            run.console.print(f"  closed the MLflow run of {stage.name}, left open when the "
                              "pipeline stopped right after the stage finished")
    return manifest


def _set_aside(run: _Pass, stage: Stage, reason: str, inputs: dict[str, str]) -> None:
    """Name what changed and move the finished result it replaces to RUN/history/ (run.keep_history)."""
    old = run.run_dir.read_manifest(stage.name)
    assert old is not None, "a replaced result has a manifest"
    changes = []
    if reason == "config changed":
        recorded = old.config or {k: v for k, v in run.previous.items() if k not in UNHASHED_KEYS}
        changes = config_changes(recorded, stage_config(run.config, stage.config_keys), stage.config_keys)
        run.console.print(f"  changed: {describe(changes) or 'keys not recorded by the earlier run'}")
    else:
        changed = sorted(k for k in {*old.inputs, *inputs} if old.inputs.get(k) != inputs.get(k))
        what = [f"the data under {run.config.data.root}" if k == "data" else f"{k}'s result"
                if k in stage.upstream else f"its input {k} (what a config key names)" for k in changed]
        run.console.print(f"  changed: {', '.join(what)}")
    record = {"stage": stage.name, "reason": reason, "config_hash": old.config_hash, "inputs": old.inputs,
              "changes": [list(c) for c in changes], "mlflow_parent_run_id": run.previous_parent}
    moved = archive_stage(run.run_dir.path, stage.name, old.digest, run.config.run.keep_history, record)
    run.console.print(f"  the finished {stage.name} result it replaces was "
                      + (f"moved to {moved}" if moved else "deleted (run.keep_history=0)"))


def _run_keys(config: Config) -> list[str]:
    """Everything but tracking decides the identity of a pipeline run."""
    return [k for k in type(config).model_fields if k != "tracking"]


def open_source(config: Config, load_data: Callable[[], Any]):
    """The configured data as an ExampleSource (see :meth:`StageContext.source`)."""
    from generalist.data.folder_source import FolderSource
    from generalist.data.packed import PackedSource
    from generalist.data.source import InMemorySource
    from generalist.registry import normalise_name

    name = normalise_name(config.data.name)
    if name == "packed":
        return PackedSource(config.data.root)
    if name == "image_folder":
        return FolderSource(config.data.root, seed=config.run.seed, **config.data.options)
    return InMemorySource(load_data())


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


def _run_stage(run: _Pass, stage: Stage, config_hash: str, inputs: dict[str, str]) -> Manifest:
    config, run_dir = run.config, run.run_dir
    stage_dir = _prepare_stage_dir(run_dir, stage.name, config_hash, inputs)
    started = time.perf_counter()
    with run.tracker.child(stage.name, stage_dir) as logger:
        logger.log_params({k: v for k, v in config.flat().items() if k.startswith(stage.config_keys)})
        ctx = StageContext(
            config=config,
            run_dir=run_dir,
            stage_dir=stage_dir,
            logger=logger,
            console=run.console,
            device=run.device,
            load_data=run.load_data,
            upstream={name: run.manifests[name] for name in stage.upstream},
            tracker=run.tracker,
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
            config=stage_config(config, stage.config_keys),
        )
        logger.log_artifact(run_dir.manifest_path(stage.name))
    run.console.print(f"[green]done[/] {stage.name} in {seconds:.1f}s")
    return manifest
