"""A run's grouping as a person left it: edited groups recorded, approval given, the gate that waits.

Files in ``RUN/clustering/`` besides the stage's own::

    groups.json             what the specialists train on ("source": computed or edited)
    groups_computed.json    the computed record an edit replaced (the diff's reference)
    groups_diff.json, .md   what the edit changed, class by class
    approval.json           who approved which groups.json (sha256), when; not a stage output,
                            so approving never re-runs anything

An edit applied from the command line rewrites the clustering manifest with the new outputs:
the specialists stage sees a changed input and retrains only the groups whose classes changed
(:mod:`orchestration.stages.specialists`). MLflow gets the diff and the tag
``specdistill.groups_source`` on the clustering run and the parent run, and the clustering run's
review pages (:mod:`orchestration.review`) are redrawn for the edited groups.
"""

from __future__ import annotations

import contextlib
import getpass
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from clustering import group_table
from clustering.confusion import group_shares, grouping_quality
from clustering.review import ConfusionCounts
from orchestration.artifacts import (
    CONFIG,
    COVARIANCE,
    GROUPS,
    GROUPS_TABLE,
    HOLDOUT_CONFUSION,
    MLFLOW_RECORD,
    RUN_RECORD,
    GroupsError,
    stage_dir,
)
from orchestration.config import load_config
from orchestration.files import read_json, sha256_file, write_json
from orchestration.groups_edit import (
    SOURCE_EDITED,
    check_edit,
    diff_groups,
    diff_markdown,
    edited_record,
    export_text,
    read_edit,
)
from orchestration.review import log_review
from orchestration.rundir import RunDir
from orchestration.tracking import OFFLINE_PREFIX, TRACKING_ERRORS, RunLogger, TrackingError

GROUPS_COMPUTED, GROUPS_DIFF, GROUPS_DIFF_MD = "groups_computed.json", "groups_diff.json", "groups_diff.md"
APPROVAL, CONFUSION = "approval.json", "confusion.npy"
SOURCE_TAG, APPROVED_TAG = "specdistill.groups_source", "specdistill.groups_approved"


def generalist_digest(run: Path) -> str:
    """The digest of the run's finished generalist (what an export is tied to)."""
    manifest = RunDir(run).read_manifest("generalist")
    if manifest is None:
        raise GroupsError(f"run {run} has no finished generalist; run the pipeline first: "
                          f"specdistill run CONFIG run.dir={run} --to clustering")
    return manifest.digest


def clustering_manifest(run: Path):
    """The finished clustering manifest; GroupsError naming the command when there is none."""
    manifest = RunDir(run).read_manifest("clustering")
    if manifest is None:
        raise GroupsError(f"run {run} has no grouping yet: its clustering stage has not finished; run it "
                          f"with `specdistill run CONFIG run.dir={run} --to clustering`")
    return manifest


def export_groups(run: Path, path: Path) -> int:
    """Write the run's groups by class name to ``path``; returns how many groups."""
    clustering_manifest(run)
    record = read_json(stage_dir(run, "clustering") / GROUPS)
    path.write_text(export_text(record, run.resolve(), generalist_digest(run)))
    return len(record["groups"])


def edit_outputs(folder: Path, edit_path: Path, *, generalist: str) -> tuple[list[str], dict[str, Any]]:
    """Check the edit at ``edit_path`` against the computed groups in ``folder`` and write the
    edited ``groups.json`` (+ the computed record, the diff, the review table); returns the
    files written and the diff."""
    computed_path = folder / GROUPS_COMPUTED
    computed = read_json(computed_path if computed_path.exists() else folder / GROUPS)
    names = computed["class_names"]
    groups = check_edit(read_edit(edit_path), names, overlapping=bool(computed.get("overlapping")),
                        generalist_digest=generalist, path=edit_path)
    rows = _table_rows(folder, groups, names)
    record = edited_record(computed, groups, _edit_metrics(folder, computed["metrics"], groups, rows, len(names)))
    diff = diff_groups(computed["groups"], record["groups"])
    write_json(computed_path, computed)
    write_json(folder / GROUPS, record)
    write_json(folder / GROUPS_DIFF, diff)
    (folder / GROUPS_DIFF_MD).write_text(diff_markdown(diff))
    written = [GROUPS, GROUPS_COMPUTED, GROUPS_DIFF, GROUPS_DIFF_MD]
    if rows:
        write_json(folder / GROUPS_TABLE, rows)
        written.append(GROUPS_TABLE)
    return written, diff


def _table_rows(folder: Path, groups: list[list[int]], names: list[str]) -> list[dict[str, Any]]:
    path = folder / COVARIANCE
    rows = group_table(np.load(path), [np.asarray(g) for g in groups], names) if path.exists() else []
    if rows and (folder / CONFUSION).exists():
        add_confusion_shares(rows, np.load(folder / CONFUSION))
    return rows


def add_confusion_shares(rows: list[dict[str, Any]], confusion: np.ndarray) -> list[dict[str, Any]]:
    """Set ``confusion_share`` on each group-table row: the share of the generalist's off-diagonal
    holdout confusion mass (``confusion``: the soft (K, K) confusion the groups are chosen on)
    between the group's classes. For disjoint groups they sum to the stage's ``captured_share``;
    ``mass_share`` is the same share of the prediction covariance."""
    shares = group_shares(confusion, [row["class_indices"] for row in rows])
    for row, share in zip(rows, shares, strict=True):
        row["confusion_share"] = float(share)
    return rows


def _edit_metrics(folder: Path, computed: dict[str, Any], groups: list[list[int]], rows, k: int) -> dict[str, Any]:
    """The computed grouping's metrics, with those that depend on the groups recomputed."""
    covered = {c for g in groups for c in g}
    metrics = {**computed, "n_specialist_groups": len(groups), "n_unassigned": k - len(covered),
               "mean_group_size": float(np.mean([len(g) for g in groups])),
               "class_coverage": float(sum(len(g) for g in groups) / k)}
    if rows:
        metrics["mass_captured"] = float(sum(r["mass_share"] for r in rows))
    if (folder / CONFUSION).exists():
        metrics.update(grouping_quality(np.load(folder / CONFUSION), groups))
    return metrics


def apply_groups(run: Path, edit_path: Path) -> dict[str, Any]:
    """Record the edit at ``edit_path`` as run ``run``'s grouping: files, manifest, MLflow."""
    old = clustering_manifest(run)
    folder = stage_dir(run, "clustering")
    written, diff = edit_outputs(folder, edit_path, generalist=generalist_digest(run))
    record = read_json(folder / GROUPS)
    RunDir(run).write_manifest(
        "clustering", config_hash=old.config_hash, inputs=old.inputs, outputs=sorted({*old.outputs, *written}),
        metrics={**old.metrics, **record["metrics"]}, config=old.config,
        details={**old.details, "groups_source": SOURCE_EDITED, "groups_file": str(edit_path.resolve())})
    with _recorded_on_disk(run, "--apply FILE"):
        client, parent, child = _mlflow(run)
        for run_id in filter(None, (parent, child)):
            client.set_tag(run_id, SOURCE_TAG, SOURCE_EDITED)
        if child:
            for name in (GROUPS_DIFF_MD, GROUPS_DIFF, GROUPS):
                client.log_artifact(child, str(folder / name), "edit")
            _log_edited_metrics(client, child, record["metrics"])
            _log_edited_review(run, folder, RunLogger(client, child), record)
    return diff


@contextlib.contextmanager
def _recorded_on_disk(run: Path, again: str) -> Iterator[None]:
    """TrackingError naming what is already safe in the run directory when MLflow does not answer."""
    try:
        yield
    except TRACKING_ERRORS as exc:
        raise TrackingError(f"recorded in {stage_dir(run, 'clustering')}, but MLflow did not take it "
                            f"({type(exc).__name__}: {str(exc)[:200]}); run `specdistill groups {run} {again}` "
                            "again once the tracking server answers") from None


def _log_edited_metrics(client: MlflowClient, run_id: str, metrics: dict[str, Any]) -> None:
    """The edited grouping's metrics at step 1 (the computed ones are step 0): the run's latest
    values describe the groups the specialists train on."""
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 1) for k, v in metrics.items()
                                      if isinstance(v, int | float) and np.isfinite(v)])


def _log_edited_review(run: Path, folder: Path, logger: RunLogger, record: dict[str, Any]) -> None:
    """The review pages of the edited groups (replacing the computed ones) in the clustering run."""
    from generalist.data import create_dataset

    config = load_config(run / CONFIG)
    data = create_dataset(config.data.name, root=config.data.root, seed=config.run.seed, **config.data.options)
    with np.load(folder / HOLDOUT_CONFUSION) as counts:
        log_review(logger, [g["classes"] for g in record["groups"]], record["class_names"],
                   ConfusionCounts(**counts), data.train, SOURCE_EDITED)


def approve(run: Path) -> dict[str, Any]:
    """Record approval of the run's current groups (``approval.json`` + the MLflow tag)."""
    clustering_manifest(run)
    folder = stage_dir(run, "clustering")
    record = read_json(folder / GROUPS)
    approval = {"groups_sha256": sha256_file(folder / GROUPS), "source": record.get("source", "computed"),
                "n_groups": len(record["groups"]), "approved_by": getpass.getuser(), "approved": time.time()}
    write_json(folder / APPROVAL, approval)
    with _recorded_on_disk(run, "--approve"):
        client, parent, child = _mlflow(run)
        for run_id in filter(None, (parent, child)):
            client.set_tag(run_id, APPROVED_TAG, "true")
    return approval


def is_approved(run: Path) -> bool:
    """Whether ``approval.json`` approves the groups the run holds now (an edit voids it)."""
    folder = stage_dir(run, "clustering")
    path = folder / APPROVAL
    return path.exists() and read_json(path).get("groups_sha256") == sha256_file(folder / GROUPS)


def _mlflow(run: Path) -> tuple[MlflowClient, str | None, str | None]:
    """The run's tracking client, its parent run id and its clustering run id (None: none, or one
    still waiting in the offline buffer)."""
    record = read_json(run / RUN_RECORD)
    path = stage_dir(run, "clustering") / MLFLOW_RECORD
    child = read_json(path)["mlflow_run_id"] if path.exists() else None
    parent, child = (i if i and not i.startswith(OFFLINE_PREFIX) else None for i in (record["mlflow_run_id"], child))
    return MlflowClient(tracking_uri=record["tracking_uri"], registry_uri=record["tracking_uri"]), parent, child


def run_link(uri: str, experiment_id: str, run_id: str) -> str:
    """Where a person opens MLflow run ``run_id``: its URL on a server, else the ``mlflow ui`` command."""
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"`mlflow ui --backend-store-uri {uri}`, then http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}"


def approval_message(run: Path, uri: str, experiment_id: str) -> str | None:
    """None when the run's groups are approved, else the message saying how to review and go on."""
    if is_approved(run):
        return None
    child = stage_dir(run, "clustering") / MLFLOW_RECORD
    run_id = read_json(child)["mlflow_run_id"] if child.exists() else read_json(run / RUN_RECORD)["mlflow_run_id"]
    return (f"waiting for approval (clustering.require_approval): review the groups in MLflow at "
            f"{run_link(uri, experiment_id, run_id)} (review/overview.md) or with `specdistill groups {run}`; "
            f"edit them with `specdistill groups {run} --export FILE`, then `--apply FILE`; approve them "
            f"with `specdistill groups {run} --approve`, then run the same command again to continue")
