"""``specdistill predict MODEL IMAGE...``: the distilled student's top-k classes for image files.

``MODEL`` is a run directory (its ``RUN/distill/student.safetensors`` + ``student.json``) or a
registered student, ``models:/NAME@ALIAS`` (or ``models:/NAME/VERSION``), as the distill stage
registers it: serialised with ``torch.export``, so loading it never unpickles.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from orchestration.artifacts import STUDENT, image_shape, require_stage_output, stage_dir
from orchestration.checkpoints import load_model
from orchestration.ensemble_api import read_image
from orchestration.serve_protocol import top_k_problem


class PredictError(ValueError):
    """The model or the request cannot be used; the message names the fix."""


@dataclass(frozen=True)
class Student:
    """A student ready for inference: ``(B, C, H, W)`` float in [0, 1] -> ``(B, K)`` logits."""

    model: Callable[[Tensor], Tensor]
    class_names: list[str]
    image_shape: tuple[int, int, int]


def load_student(source: str, tracking_uri: str) -> Student:
    """The student of a run directory or of a registered model URI."""
    if source.startswith("models:/"):
        return _registered(source, tracking_uri)
    stem = stage_dir(source, "distill") / STUDENT
    require_stage_output(stem.with_suffix(".safetensors"), "distill")
    model, meta = load_model(stem)
    return Student(model, list(meta["class_names"]), image_shape(meta))


def _registered(uri: str, tracking_uri: str) -> Student:
    import mlflow
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    from orchestration.model_registry import fluent_tracking

    try:
        with fluent_tracking(tracking_uri):
            info = mlflow.models.get_model_info(uri)
            model = mlflow.pytorch.load_model(uri)
    except MlflowException as exc:
        raise PredictError(f"cannot load {uri} from {tracking_uri} ({str(exc)[:300]}); check the name and "
                           "alias (the distill stage registers specdistill-student@candidate) and the "
                           "tracking URI (--tracking-uri or MLFLOW_TRACKING_URI)") from None
    shape = info.signature.inputs.inputs[0].shape             # (-1, C, H, W)
    return Student(model, list(info.metadata["class_names"]), tuple(int(d) for d in shape[1:]))


@torch.no_grad()
def predict(student: Student, paths: Sequence[str | Path], top_k: int) -> list[list[tuple[str, float]]]:
    """Per image, the ``top_k`` ``(class name, probability)`` pairs, most probable first."""
    problem = top_k_problem(top_k, len(student.class_names))
    if problem:
        raise PredictError(problem)
    images = torch.stack([read_image(p, student.image_shape) for p in paths]).float() / 255.0  # (N, C, H, W)
    probs = torch.softmax(student.model(images), dim=1)                                      # (N, K)
    top = probs.topk(top_k, dim=1)
    return [[(student.class_names[c], float(p)) for p, c in zip(values, ids, strict=True)]
            for values, ids in zip(top.values.tolist(), top.indices.tolist(), strict=True)]
