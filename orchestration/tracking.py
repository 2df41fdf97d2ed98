"""MLflow tracking: one parent run per pipeline run, one child run per stage.

Uses ``MlflowClient`` with explicit run ids (no global "active run"), so the same code works
in the driver, in Ray workers and against a remote ``mlflow server``. The parent run id is
kept in ``RUN/run.json`` and a stage's child run id in ``RUN/<stage>/mlflow.json``, so a
re-run or a resumed stage logs into the same runs instead of creating duplicates.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from orchestration.rundir import read_json, write_json

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_LEN = 6000


class TrackingError(RuntimeError):
    """The MLflow tracking server cannot be used."""


def resolve_tracking_uri(configured: str | None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else a sqlite file in the working directory."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any training, when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return
    except (urllib.error.URLError, OSError) as exc:
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({exc}); start it "
            "(mlflow server --host 127.0.0.1 --port 5000) or set tracking.uri / MLFLOW_TRACKING_URI"
        ) from None


class RunLogger:
    """Logs into one MLflow run."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client = client
        self.run_id = run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        existing = self.client.get_run(self.run_id).data.params
        fresh = [
            Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items() if k not in existing
        ]
        for start in range(0, len(fresh), 100):
            self.client.log_batch(self.run_id, params=fresh[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        batch = [RunTag(k, str(v)[:MAX_PARAM_LEN]) for k, v in tags.items()]
        if batch:
            self.client.log_batch(self.run_id, tags=batch)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: Any, name: str) -> None:
        self.client.log_dict(self.run_id, data, name)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_figure(self, figure: Any, name: str) -> None:
        self.client.log_figure(self.run_id, figure, name)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


class PipelineTracker:
    """The parent run of a pipeline run, and child runs for its stages."""

    def __init__(self, uri: str, experiment: str, run_dir: Path):
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.run_dir = run_dir
        self.experiment_id = self._experiment_id(experiment)
        self.parent: RunLogger | None = None

    def _experiment_id(self, name: str) -> str:
        try:
            found = self.client.get_experiment_by_name(name)
            return found.experiment_id if found else self.client.create_experiment(name)
        except MlflowException as exc:
            raise TrackingError(f"cannot use MLflow experiment {name!r} at {self.uri}: {exc}") from None

    def _reusable(self, run_id: str | None, parent_id: str | None = None) -> bool:
        if not run_id:
            return False
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return False
        same_parent = parent_id is None or run.data.tags.get(PARENT_TAG) == parent_id
        return run.info.experiment_id == self.experiment_id and same_parent

    def start_parent(self, run_name: str, config_hash: str) -> RunLogger:
        """Reuse the parent run recorded for this run dir and config, else start a new one."""
        record_path = self.run_dir / "run.json"
        record = read_json(record_path) if record_path.exists() else {}
        run_id = record.get("mlflow_run_id") if record.get("config_hash") == config_hash else None
        if not self._reusable(run_id) or record.get("tracking_uri") != self.uri:
            run_id = self.client.create_run(
                self.experiment_id, run_name=run_name, tags={"specdistill.run_dir": str(self.run_dir)}
            ).info.run_id
            write_json(
                record_path,
                {"mlflow_run_id": run_id, "config_hash": config_hash, "tracking_uri": self.uri},
            )
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.parent = RunLogger(self.client, run_id)
        return self.parent

    @contextmanager
    def child(self, stage: str, stage_dir: Path, tags: Mapping[str, Any] | None = None) -> Iterator[RunLogger]:
        """A child run for ``stage``; a resumed stage gets its earlier child run back."""
        assert self.parent is not None, "start_parent first"
        record_path = stage_dir / "mlflow.json"
        record = read_json(record_path) if record_path.exists() else {}
        run_id = record.get("mlflow_run_id")
        if self._reusable(run_id, parent_id=self.parent.run_id):
            self.client.update_run(run_id, status="RUNNING")
        else:
            all_tags = {PARENT_TAG: self.parent.run_id, "specdistill.stage": stage}
            run_id = self.client.create_run(
                self.experiment_id, run_name=stage, tags=all_tags
            ).info.run_id
            write_json(record_path, {"mlflow_run_id": run_id})
        logger = RunLogger(self.client, run_id)
        if tags:
            logger.set_tags(tags)
        try:
            yield logger
        except BaseException:
            logger.finish("FAILED")
            raise
        logger.finish()
