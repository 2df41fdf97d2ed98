"""The MLflow model registry: log a trained student with ``mlflow.pytorch`` and register it.

The model is logged into an existing run (the distill stage's child run) with an input
example (so MLflow records a tensor signature), the student's checkpoint metadata as an extra
file (architecture, class names, config, metrics) and the class names in the model metadata.
It is serialised with ``torch.export`` (``pt2``), so loading it back never unpickles. Then it is
registered under a name and the alias (``candidate``) is moved to the new version::

    mlflow.pytorch.load_model("models:/specdistill-student@candidate")
"""

from __future__ import annotations

import copy
import importlib.metadata
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pytorch
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from orchestration.tracking import TrackingError

ARTIFACT_NAME = "student"
DEFAULT_ALIAS = "candidate"


@dataclass(frozen=True)
class RegisteredModel:
    """Where a logged student lives: its model URI and, once registered, name/version/alias."""

    model_uri: str                     # models:/<model id>, the logged model itself
    run_id: str
    name: str | None = None
    version: str | None = None
    alias: str | None = None

    @property
    def alias_uri(self) -> str | None:
        return f"models:/{self.name}@{self.alias}" if self.name and self.alias else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "alias_uri": self.alias_uri}


_URI_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@contextmanager
def fluent_tracking(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (which log_model needs) at ``uri``; restore it afterwards.

    ``set_registry_uri`` also exports ``MLFLOW_REGISTRY_URI``; both are put back as they were, so a
    registry that followed the tracking URI before follows it again (later clients of another
    store do not read this one's registry)."""
    previous_env = {key: os.environ.get(key) for key in _URI_ENV}
    previous_tracking = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous_tracking)
        mlflow.set_registry_uri(previous_env["MLFLOW_REGISTRY_URI"])  # None: follow the tracking URI
        for key, value in previous_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _torch_requirement() -> list[str]:
    """Pin torch as pip knows it (torch.__version__ may carry a local tag such as +cu130)."""
    try:
        return [f"torch=={importlib.metadata.version('torch')}"]
    except importlib.metadata.PackageNotFoundError:
        return ["torch"]


def log_student(
    client: MlflowClient,
    run_id: str,
    model: torch.nn.Module,
    *,
    example: torch.Tensor,
    class_names: Sequence[str],
    metrics: Mapping[str, float] | None = None,
    params: Mapping[str, Any] | None = None,
    extra_files: Sequence[Path] = (),
    model_name: str | None = None,
    alias: str = DEFAULT_ALIAS,
    description: str | None = None,
) -> RegisteredModel:
    """Log ``model`` into run ``run_id`` and, with ``model_name``, register it and set ``alias``.

    ``example``: ``(B, C, H, W)`` float inputs in [0, 1] with ``B >= 2`` (the exported program
    keeps the batch dimension dynamic only if the example's batch is not 1). ``metrics`` and
    ``params`` are attached to the logged model; ``extra_files`` travel with its artifacts;
    ``description`` (the model card, Markdown) becomes the registered version's description.
    Raises TrackingError when MLflow refuses (message names the run and the model name).
    """
    if example.ndim != 4 or example.shape[0] < 2:
        raise ValueError(f"example must be (B, C, H, W) with B >= 2, got {tuple(example.shape)}")
    cpu_model = copy.deepcopy(model).cpu().eval()
    try:
        with fluent_tracking(client.tracking_uri), mlflow.start_run(run_id=run_id, nested=True):
            info = mlflow.pytorch.log_model(
                cpu_model,
                name=ARTIFACT_NAME,
                input_example=example.detach().cpu().float().numpy(),
                metadata={"class_names": list(class_names), "num_classes": len(class_names)},
                params=dict(params or {}),
                extra_files=[str(p) for p in extra_files] or None,
                pip_requirements=_torch_requirement(),
                serialization_format="pt2",
            )
            if metrics:
                mlflow.log_metrics(dict(metrics), model_id=info.model_id)
        registered = RegisteredModel(model_uri=info.model_uri, run_id=run_id)
        if model_name:
            registered = _register(client, registered, model_name, alias, description)
    except MlflowException as exc:
        raise TrackingError(
            f"cannot log or register the student (run {run_id}, model name {model_name!r}) at "
            f"{client.tracking_uri}: {exc}"
        ) from None
    return registered


def _register(client: MlflowClient, logged: RegisteredModel, name: str, alias: str,
              description: str | None) -> RegisteredModel:
    with fluent_tracking(client.tracking_uri):
        version = mlflow.register_model(logged.model_uri, name).version
    client.set_registered_model_alias(name, alias, str(version))
    if description:
        client.update_model_version(name, str(version), description=description)
    return RegisteredModel(logged.model_uri, logged.run_id, name, str(version), alias)
