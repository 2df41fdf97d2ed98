"""MLflow tracking: one parent run per pipeline run, one child run per stage.

Uses ``MlflowClient`` with explicit run ids (no global "active run"), so the same code works
in the driver, in Ray workers and against a remote ``mlflow server``. The parent run id is
kept in ``RUN/run.json`` and a stage's child run id in ``RUN/<stage>/mlflow.json``, so a
re-run or a resumed stage logs into the same runs instead of creating duplicates.

A tracking server that goes away mid-run does not stop training: the first failed call
prints one warning, and from then on tracking calls (metrics, params, tags, artifacts, run
creation and termination) are appended to ``RUN/mlflow_buffer.jsonl``; the server is tried
again every ``RETRY_SECONDS``, and the buffer is replayed, in order, as soon as it answers (at
the latest by the next ``specdistill run`` of the same run directory). A server that is
unreachable at the start still fails fast (:func:`check_reachable`), before any training.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from orchestration.artifacts import MLFLOW_RECORD, RUN_RECORD, TRACKING_BUFFER
from orchestration.files import read_json, write_json

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
PARENT_TAG = "mlflow.parentRunId"
# Parent runs of successive configs in one run directory point at each other.
PREVIOUS_PARENT_TAG, NEXT_PARENT_TAG = "specdistill.previous_parent_run_id", "specdistill.next_parent_run_id"
MAX_PARAM_LEN = 6000
RETRY_SECONDS = 30.0
OFFLINE_PREFIX = "offline-"

# MLflow's REST client retries a refused connection 7 times with exponential backoff (minutes
# per call); a pipeline would rather buffer and go on. Explicit settings still win.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

try:  # requests' errors subclass OSError; MLflow wraps most of them in MlflowException
    from requests.exceptions import RequestException as _RequestException
except ImportError:  # pragma: no cover
    _RequestException = OSError
TRACKING_ERRORS = (MlflowException, OSError, _RequestException)


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


class Connection:
    """Whether the tracking server answers, and the on-disk buffer for calls made while it does not."""

    def __init__(self, client: MlflowClient, uri: str, run_dir: Path):
        self.client, self.uri = client, uri
        self.buffer_path = run_dir / TRACKING_BUFFER
        self.offline_since: float | None = None
        self.ids: dict[str, str] = {}  # offline run id -> the real one, once its creation was replayed

    def should_try(self) -> bool:
        return self.offline_since is None or time.monotonic() - self.offline_since >= RETRY_SECONDS

    def went_offline(self, exc: BaseException) -> None:
        if self.offline_since is None:
            print(f"warning: MLflow at {self.uri} failed ({type(exc).__name__}: {str(exc)[:200]}); "
                  f"training continues and tracking calls are buffered in {self.buffer_path}; they are "
                  "sent when the server answers again (at the latest on the next `specdistill run`)",
                  file=sys.stderr, flush=True)
        self.offline_since = time.monotonic()

    def back_online(self) -> None:
        if self.offline_since is not None:
            self.offline_since = None
            self.replay()

    def buffer(self, entry: dict[str, Any]) -> None:
        with open(self.buffer_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def replay(self) -> int:
        """Send the buffered calls in order; returns how many were sent. Stops at the first one that
        fails again (the rest stay buffered)."""
        if not self.buffer_path.exists():
            return 0
        entries = [json.loads(line) for line in self.buffer_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        ids = self.ids
        for done, entry in enumerate(entries):
            try:
                _send(self.client, entry, ids)
            except TRACKING_ERRORS as exc:
                rest = [{**e, "run_id": ids.get(e["run_id"], e["run_id"])} for e in entries[done:]]
                tmp = self.buffer_path.with_suffix(".tmp")
                tmp.write_text("".join(json.dumps(e) + "\n" for e in rest), encoding="utf-8")
                os.replace(tmp, self.buffer_path)
                self.went_offline(exc)
                return done
        self.buffer_path.unlink()
        print(f"sent {len(entries)} buffered MLflow calls to {self.uri}", file=sys.stderr, flush=True)
        return len(entries)


def _send(client: MlflowClient, entry: dict[str, Any], ids: dict[str, str]) -> Any:
    """Perform one (live or buffered) tracking call; ``ids`` maps offline run ids to real ones."""
    kind, run_id, p = entry["kind"], ids.get(entry["run_id"], entry["run_id"]), entry.get("payload", {})
    if kind == "create_run":
        parent = ids.get(p["tags"].get(PARENT_TAG, ""), p["tags"].get(PARENT_TAG))
        tags = {**p["tags"], **({PARENT_TAG: parent} if parent else {})}
        real = client.create_run(p["experiment_id"], run_name=p["run_name"], tags=tags).info.run_id
        ids[entry["run_id"]] = real
        if p.get("record"):
            write_json(Path(p["record"]), {"mlflow_run_id": real})
        return real
    if kind == "params":
        existing = client.get_run(run_id).data.params
        fresh = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in p["params"].items() if k not in existing]
        for start in range(0, len(fresh), 100):
            client.log_batch(run_id, params=fresh[start : start + 100])
    elif kind == "metrics":
        batch = [Metric(k, float(v), p["timestamp"], p["step"]) for k, v in p["metrics"].items()]
        if batch:
            client.log_batch(run_id, metrics=batch)
    elif kind == "tags":
        batch = [RunTag(k, str(v)[:MAX_PARAM_LEN]) for k, v in p["tags"].items()]
        if batch:
            client.log_batch(run_id, tags=batch)
    elif kind == "artifact":
        client.log_artifact(run_id, p["path"], p["artifact_path"])
    elif kind == "text":
        client.log_text(run_id, p["text"], p["name"])
    elif kind == "dict":
        client.log_dict(run_id, p["data"], p["name"])
    elif kind == "table":
        client.log_table(run_id, data=p["data"], artifact_file=p["artifact_file"])
    elif kind == "terminate":
        client.set_terminated(run_id, status=p["status"])
    elif kind == "status":
        client.update_run(run_id, status=p["status"])
    else:
        raise ValueError(f"unknown buffered MLflow call {kind!r}")
    return None


class RunLogger:
    """Logs into one MLflow run; with a :class:`Connection`, calls made while the server is away
    are buffered on disk instead of failing (see the module docstring)."""

    def __init__(self, client: MlflowClient, run_id: str, connection: Connection | None = None):
        self.client = client
        self.run_id = run_id
        self.connection = connection

    def _call(self, kind: str, payload: dict[str, Any]) -> None:
        conn = self.connection
        if conn is not None and self.run_id in conn.ids:
            self.run_id = conn.ids[self.run_id]
        entry = {"kind": kind, "run_id": self.run_id, "payload": payload}
        if conn is None:
            _send(self.client, entry, {})
            return
        if self.run_id.startswith(OFFLINE_PREFIX) or not conn.should_try():
            conn.buffer(entry)
            return
        try:
            _send(self.client, entry, {})
        except TRACKING_ERRORS as exc:
            conn.went_offline(exc)
            conn.buffer(entry)
            return
        conn.back_online()

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._call("params", {"params": {k: str(v)[:MAX_PARAM_LEN] for k, v in params.items()}})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if metrics:
            self._call("metrics", {"metrics": {k: float(v) for k, v in metrics.items()},
                                   "step": step or 0, "timestamp": int(time.time() * 1000)})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if tags:
            self._call("tags", {"tags": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._call("artifact", {"path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def log_dict(self, data: Any, name: str) -> None:
        self._call("dict", {"data": data, "name": name})

    def log_text(self, text: str, name: str) -> None:
        self._call("text", {"text": text, "name": name})

    def log_table(self, data: Mapping[str, list], artifact_file: str) -> None:
        self._call("table", {"data": {k: list(v) for k, v in data.items()}, "artifact_file": artifact_file})

    def log_figure(self, figure: Any, name: str) -> None:
        if self.connection is None:
            self.client.log_figure(self.run_id, figure, name)
            return
        path = self.connection.buffer_path.parent / f".mlflow-figures/{uuid.uuid4().hex}/{Path(name).name}"
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path)
        self._call("artifact", {"path": str(path.resolve()), "artifact_path": str(Path(name).parent) if Path(name).parent != Path(".") else None})

    def set_status(self, status: str) -> None:
        """Mark the run ``RUNNING`` again (a resumed stage or specialist) without ending it."""
        self._call("status", {"status": status})

    def finish(self, status: str = "FINISHED") -> None:
        self._call("terminate", {"status": status})


class PipelineTracker:
    """The parent run of a pipeline run, and child runs for its stages."""

    def __init__(self, uri: str, experiment: str, run_dir: Path):
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        self.run_dir = run_dir
        self.experiment_id = self._experiment_id(experiment)
        self.connection = Connection(self.client, uri, run_dir)
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
        if run_id.startswith(OFFLINE_PREFIX):
            return True
        try:
            run = self.client.get_run(run_id)
        except TRACKING_ERRORS:
            return False
        same_parent = parent_id is None or run.data.tags.get(PARENT_TAG) == parent_id
        return run.info.experiment_id == self.experiment_id and same_parent

    def _linkable(self, run_id: str | None) -> bool:
        """An earlier parent run of this experiment that can still be tagged (not deleted)."""
        if not run_id or run_id.startswith(OFFLINE_PREFIX):
            return False
        try:
            run = self.client.get_run(run_id)
        except TRACKING_ERRORS:
            return False
        return run.info.experiment_id == self.experiment_id and run.info.lifecycle_stage == "active"

    def start_parent(self, run_name: str, config_hash: str) -> RunLogger:
        """Reuse the parent run recorded for this run dir and config, else start a new one. A new
        parent that follows another config's parent in the same run directory (and store) is
        linked both ways: tag ``specdistill.previous_parent_run_id`` on the new one,
        ``specdistill.next_parent_run_id`` on the previous one."""
        self.connection.replay()  # calls buffered while the server was away in an earlier run
        record_path = self.run_dir / RUN_RECORD
        record = read_json(record_path) if record_path.exists() else {}
        run_id = record.get("mlflow_run_id") if record.get("config_hash") == config_hash else None
        if not self._reusable(run_id) or record.get("tracking_uri") != self.uri:
            previous = record.get("mlflow_run_id") if record.get("tracking_uri") == self.uri else None
            previous = previous if self._linkable(previous) else None
            tags = {"specdistill.run_dir": str(self.run_dir), **({PREVIOUS_PARENT_TAG: previous} if previous else {})}
            run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id
            if previous:
                self.client.set_tag(previous, NEXT_PARENT_TAG, run_id)
            write_json(record_path, {"mlflow_run_id": run_id, "config_hash": config_hash,
                                     "tracking_uri": self.uri, "previous_mlflow_run_id": previous})
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.parent = RunLogger(self.client, run_id, self.connection)
        return self.parent

    def create_child(self, run_name: str, tags: Mapping[str, Any], record_path: Path | None = None) -> str:
        """A new child run of the parent (its id written to ``record_path``); while the server is
        away, an offline id whose creation is buffered and replayed later."""
        assert self.parent is not None, "start_parent first"
        all_tags = {PARENT_TAG: self.parent.run_id, **{k: str(v) for k, v in tags.items()}}
        payload = {"experiment_id": self.experiment_id, "run_name": run_name, "tags": all_tags,
                   "record": str(record_path) if record_path else None}
        if self.connection.should_try() and not self.parent.run_id.startswith(OFFLINE_PREFIX):
            try:
                run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags).info.run_id
            except TRACKING_ERRORS as exc:
                self.connection.went_offline(exc)
            else:
                self.connection.back_online()
                if record_path is not None:
                    write_json(record_path, {"mlflow_run_id": run_id})
                return run_id
        run_id = f"{OFFLINE_PREFIX}{uuid.uuid4().hex}"
        self.connection.buffer({"kind": "create_run", "run_id": run_id, "payload": payload})
        if record_path is not None:
            write_json(record_path, {"mlflow_run_id": run_id})
        return run_id

    def flush(self) -> int:
        """Try to send what is buffered now (end of a run); returns how many calls were sent."""
        return self.connection.replay() if self.connection.buffer_path.exists() else 0

    def logger(self, run_id: str) -> RunLogger:
        """A logger for the run ``run_id`` of this store (buffered while the server is away)."""
        return RunLogger(self.client, run_id, self.connection)

    def open_child(self, run_name: str, tags: Mapping[str, Any], record_path: Path) -> RunLogger:
        """The child run recorded at ``record_path`` when it belongs to this parent (marked
        RUNNING again: a resumed stage or specialist), else a new child recorded there."""
        assert self.parent is not None, "start_parent first"
        record = read_json(record_path) if record_path.exists() else {}
        run_id = record.get("mlflow_run_id")
        if self._reusable(run_id, parent_id=self.parent.run_id):
            logger = self.logger(run_id)
            logger.set_status("RUNNING")
            return logger
        return self.logger(self.create_child(run_name, tags, record_path))

    def running_child(self, record_path: Path) -> RunLogger | None:
        """The run recorded at ``record_path`` if the server says it is still RUNNING (a stage or
        specialist that finished just before the pipeline was killed), else None (also when the
        server cannot be asked: nothing is lost, the next run asks again)."""
        run_id = read_json(record_path).get("mlflow_run_id") if record_path.exists() else None
        if not run_id or run_id.startswith(OFFLINE_PREFIX) or not self.connection.should_try():
            return None
        try:
            if self.client.get_run(run_id).info.status != "RUNNING":
                return None
        except TRACKING_ERRORS:
            return None
        return self.logger(run_id)

    def close_finished_stage(self, stage_dir: Path, manifest_path: Path) -> bool:
        """Mark FINISHED a finished stage's child run that is still RUNNING, with its manifest.

        A pipeline killed after a stage wrote its manifest but before it closed its MLflow run
        leaves that run RUNNING; the resumed pipeline skips the stage, so it closes the run here.
        Returns whether it closed one."""
        logger = self.running_child(stage_dir / MLFLOW_RECORD)
        if logger is None:
            return False
        logger.log_artifact(manifest_path)
        logger.finish()
        return True

    @contextmanager
    def child(self, stage: str, stage_dir: Path, tags: Mapping[str, Any] | None = None) -> Iterator[RunLogger]:
        """A child run for ``stage``; a resumed stage gets its earlier child run back."""
        logger = self.open_child(stage, {"specdistill.stage": stage}, stage_dir / MLFLOW_RECORD)
        if tags:
            logger.set_tags(tags)
        try:
            yield logger
        except BaseException:
            logger.finish("FAILED")
            raise
        logger.finish()
