"""A run directory's files, named once, and what several places load from them.

Layout (``RUN`` = ``run.dir``, or ``run.root/run.name``)::

    RUN/config.yaml                          the resolved config of the latest invocation
    RUN/run.json                             MLflow parent run id, config hash, tracking URI
    RUN/mlflow_buffer.jsonl                  tracking calls made while the server was away
    RUN/report.md, accuracy_vs_params.png, per_group_gain.png    the results report
    RUN/<stage>/manifest.json                written last, atomically: the stage is done
    RUN/<stage>/attempt.json                 config hash + inputs its partial work was made for
    RUN/<stage>/mlflow.json                  the stage's MLflow child run
    RUN/generalist/model.safetensors|.json   the generalist (best epoch) and its metadata
    RUN/generalist/metrics.json              its test metrics
    RUN/<loop>/checkpoints/                  per-epoch snapshots (orchestration.checkpoints)
    RUN/clustering/groups.json               the confusable groups (what the specialists train on)
    RUN/clustering/groups_table.json         the review table (class names per group)
    RUN/clustering/covariance.npy            the holdout prediction covariance (dense K)
    RUN/clustering/confusion.npy             the holdout soft confusion (dense K, confusion path)
    RUN/clustering/holdout_confusion.npz     the generalist's holdout confusion counts (sparse)
    RUN/clustering/groups_computed.json, groups_diff.json|.md, approval.json
                                             an edit and an approval (orchestration.groups_record)
    RUN/specialists/specialists.json         the index: one entry per trained specialist
    RUN/specialists/group_NNN/model.*        a prior-corrected specialist (+ mlflow.json,
                                             progress.json, worker.pid while it trains)
    RUN/specialists/same_compute/model.*     the generalist trained on for what the specialists
                                             saw (the same-compute baseline)
    RUN/ensemble/evaluation.json, table4.json, table4.md     the ensemble's evaluation
    RUN/ensemble/combination.json            the specialists' temperature chosen on the holdout
    RUN/ensemble/cache/                      the soft-target cache (specialists.ensemble)
    RUN/distill/student.safetensors|.json    the student; baselines/<row>/ the other rows,
                                             each with row.json once finished
    RUN/distill/schemes/<scheme>/            the models of distill.scheme (one folder each)
    RUN/distill/results.json, results.md, registry.json
    RUN/history/<stage>/<fingerprint>/       a finished stage folder a config or data change
                                             replaced (orchestration.history), + archived.json

The loaders raise ``FileNotFoundError`` naming the unfinished stage and the command that runs it.
This module imports no stage script, MLflow or plotting, so Ray workers can use it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from generalist.data import DataError
from orchestration.checkpoints import (
    CheckpointError,
    build_model,
    load_model,
    load_weights,
    read_metadata,
    verify_model_files,
)
from orchestration.files import read_json
from specialists.ensemble import RoutedEnsemble, build_ensemble
from specialists.model import Specialist, build_specialist, validate_group

# RUN/
CONFIG, RUN_RECORD, TRACKING_BUFFER = "config.yaml", "run.json", "mlflow_buffer.jsonl"
REPORT_MD, PLOT_PARAMS, PLOT_GROUPS = "report.md", "accuracy_vs_params.png", "per_group_gain.png"
HISTORY, ARCHIVED = "history", "archived.json"
# RUN/<stage>/ (and RUN/specialists/group_NNN/)
MANIFEST, ATTEMPT, MLFLOW_RECORD = "manifest.json", "attempt.json", "mlflow.json"
MODEL, CHECKPOINTS, METRICS = "model", "checkpoints", "metrics.json"  # MODEL: .safetensors + .json
# RUN/clustering/
GROUPS, GROUPS_TABLE, COVARIANCE = "groups.json", "groups_table.json", "covariance.npy"
HOLDOUT_CONFUSION = "holdout_confusion.npz"  # the generalist's holdout confusion counts (sparse)
# RUN/specialists/
SPECIALISTS_INDEX, GROUP_DIR, SAME_COMPUTE_DIR = "specialists.json", "group_{:03d}", "same_compute"
PROGRESS, PID_FILE = "progress.json", "worker.pid"
# RUN/ensemble/
EVALUATION, TABLE4, TABLE4_MD, CACHE_DIR = "evaluation.json", "table4.json", "table4.md", "cache"
COMBINATION = "combination.json"  # how the specialists are combined (their temperature)
# RUN/distill/
STUDENT, ROW, BASELINES, SCHEMES = "student", "row.json", "baselines", "schemes"
RESULTS, RESULTS_MD, REGISTRY = "results.json", "results.md", "registry.json"


class GroupsError(DataError):
    """The clustering stage's groups do not fit the generalist (ids, names, empty or full groups)."""


@dataclass(frozen=True)
class LoadedEnsemble:
    """A run's ensemble, ready for inference."""

    ensemble: RoutedEnsemble
    class_names: list[str]
    image_shape: tuple[int, int, int]  # (C, H, W) the generalist expects


def stage_dir(run: str | Path, stage: str) -> Path:
    return Path(run) / stage


def cache_dir(run: str | Path) -> Path:
    """Where the ensemble stage of run ``run`` writes its soft-target cache."""
    return stage_dir(run, "ensemble") / CACHE_DIR


def require_stage_output(path: Path, stage: str) -> None:
    """FileNotFoundError naming the unfinished stage and the command that runs it, unless
    ``path`` (a file the stage writes into ``RUN/<stage>/``) exists."""
    if not path.exists():
        run = path.parents[1]
        raise FileNotFoundError(
            f"{path} is missing: the {stage} stage of run {run} has not finished; run it with "
            f"`specdistill run CONFIG run.dir={run}` (or `specdistill {stage} CONFIG run.dir={run}`)"
        )


# ----------------------------------------------------------------------------- generalist
def load_generalist(run: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The run's trained generalist (eval mode) and its metadata; CheckpointError if unusable."""
    stem = stage_dir(run, "generalist") / MODEL
    require_stage_output(stem.with_suffix(".safetensors"), "generalist")
    return load_model(stem)


def generalist_metadata(run: str | Path) -> dict[str, Any]:
    """The generalist's metadata (class names, model spec, metrics) without loading its weights."""
    stem = stage_dir(run, "generalist") / MODEL
    require_stage_output(stem.with_suffix(".safetensors"), "generalist")
    return read_metadata(stem)


def image_shape(meta: dict[str, Any]) -> tuple[int, int, int]:
    """``(C, H, W)`` a model with checkpoint metadata ``meta`` takes."""
    spec = meta["model"]
    return spec["in_channels"], spec["image_size"], spec["image_size"]


# ----------------------------------------------------------------------------- groups
def load_groups(run: str | Path) -> dict[str, Any]:
    """The clustering stage's groups record (what the specialists train on)."""
    path = stage_dir(run, "clustering") / GROUPS
    require_stage_output(path, "clustering")
    return read_json(path)


def check_groups(record: dict[str, Any], class_names: list[str]) -> list[dict[str, Any]]:
    """The groups of a clustering record, checked against the generalist's classes."""
    fix = "re-run clustering for this generalist: specdistill run CONFIG --from clustering"
    if record.get("num_classes") != len(class_names) or record.get("class_names", class_names) != class_names:
        raise GroupsError(f"the groups file was made for {record.get('num_classes')} classes that "
                          f"differ from the generalist's {len(class_names)}; {fix}")
    if not record.get("groups"):
        raise GroupsError("the groups file holds no groups (clustering dropped every group smaller "
                          "than clustering.min_group_size); lower it or set clustering.n_groups")
    for group in record["groups"]:
        try:
            classes = validate_group(group["classes"], len(class_names))
        except ValueError as exc:
            raise GroupsError(f"group {group.get('id')} of the groups file: {exc}; {fix}") from None
        names = [class_names[c] for c in classes]
        if group.get("names", names) != names:
            raise GroupsError(f"group {group['id']} names {group['names']} but its class ids "
                              f"{list(classes)} are {names} for the generalist; {fix}")
    return record["groups"]


# ----------------------------------------------------------------------------- specialists
def load_specialist(group_dir: Path) -> tuple[Specialist, dict[str, Any]]:
    """A trained, prior-corrected specialist (eval mode) and its metadata."""
    meta = read_metadata(group_dir / MODEL)
    spec = meta["specialist"]
    skeleton = build_specialist(build_model(meta["model"]), spec["classes"],
                                finetune=spec["finetune"], last_n=spec["last_n"],
                                train_out_rows=bool(spec.get("train_out_rows")))
    return load_weights(group_dir / MODEL, skeleton).eval(), meta


def specialists_index(run: str | Path) -> list[dict[str, Any]]:
    """The specialists stage's index entries, one per trained specialist."""
    path = stage_dir(run, "specialists") / SPECIALISTS_INDEX
    require_stage_output(path, "specialists")
    return read_json(path)["specialists"]


def load_same_compute(run: str | Path) -> tuple[torch.nn.Module, dict[str, Any]] | None:
    """The same-compute baseline of the run (eval mode) and its metadata; None when the
    specialists stage ran without it (``specialists.same_compute: false``)."""
    stem = stage_dir(run, "specialists") / SAME_COMPUTE_DIR / MODEL
    if not stem.with_suffix(".safetensors").exists():
        return None
    return load_model(stem)


# ----------------------------------------------------------------------------- ensemble
def load_ensemble(run: str | Path, *, top_n: int = 1, tol: float = 1e-10, max_iter: int = 1000,
                  device: torch.device | str = "cpu") -> LoadedEnsemble:
    """Generalist + specialists of a finished run, checked against the clustering groups."""
    run = Path(run)
    generalist, meta = load_generalist(run)
    class_names = list(meta["class_names"])
    groups = check_groups(load_groups(run), class_names)
    entries = specialists_index(run)
    if [list(e["classes"]) for e in entries] != [list(g["classes"]) for g in groups]:
        raise GroupsError(
            f"the specialists in {stage_dir(run, 'specialists')} were trained for other groups than "
            f"{stage_dir(run, 'clustering') / GROUPS} holds; re-train them: "
            f"specdistill run CONFIG run.dir={run} --from specialists"
        )
    specialists = [load_specialist(stage_dir(run, "specialists") / e["dir"])[0].to(device) for e in entries]
    ensemble = build_ensemble(generalist.to(device), specialists, top_n=top_n, tol=tol, max_iter=max_iter,
                              specialist_temperature=specialist_temperature(run))
    return LoadedEnsemble(ensemble, class_names, image_shape(meta))


def specialist_temperature(run: str | Path) -> float:
    """The temperature the ensemble stage combines the specialists at (1 before it ran)."""
    path = stage_dir(run, "ensemble") / COMBINATION
    return float(read_json(path)["specialist_temperature"]) if path.exists() else 1.0


def load_evaluation(run: str | Path) -> dict[str, Any]:
    """The ``evaluation.json`` of a finished ensemble stage."""
    path = stage_dir(run, "ensemble") / EVALUATION
    require_stage_output(path, "ensemble")
    return read_json(path)


# ----------------------------------------------------------------------------- distill
def finished_row(row_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(row.json's result, None)`` when the distill row in ``row_dir`` finished and its student
    files are whole; else ``(None, why)``: ``why`` is None for a row that never finished and names
    the damage (a missing, truncated or corrupt file) for one whose outputs are unusable."""
    path = row_dir / ROW
    if not path.exists():
        return None, None
    try:
        result = read_json(path)
    except ValueError as exc:
        return None, f"{path} is corrupt ({exc})"
    try:
        verify_model_files(row_dir / STUDENT)
    except CheckpointError as exc:
        return None, str(exc)
    return result, None
