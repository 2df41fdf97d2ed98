"""Checkpoints that never unpickle: weights in safetensors, metadata in JSON.

A model checkpoint is a pair ``NAME.safetensors`` + ``NAME.json`` (architecture, its keyword
arguments, class names, and anything else the stage records). Resumable training state
(optimizer, scheduler, early stopping, epoch) is saved with ``torch.save`` and read back with
``torch.load(weights_only=True)``. Every write is atomic.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from orchestration.rundir import atomic_write_bytes, write_json


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or does not fit the model."""


def save_model(path_stem: Path, model: torch.nn.Module, metadata: dict[str, Any]) -> list[Path]:
    """Write ``path_stem.safetensors`` and ``path_stem.json``; returns both paths."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = path_stem.with_suffix(".safetensors")
    meta = path_stem.with_suffix(".json")
    atomic_write_bytes(weights, st_save(state))
    write_json(meta, metadata)
    return [weights, meta]


def read_metadata(path_stem: Path) -> dict[str, Any]:
    meta = path_stem.with_suffix(".json")
    if not meta.exists():
        raise CheckpointError(f"checkpoint metadata {meta} is missing")
    try:
        return json.loads(meta.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint metadata {meta} is corrupt ({exc})") from None


def load_state(path_stem: Path) -> dict[str, torch.Tensor]:
    weights = path_stem.with_suffix(".safetensors")
    if not weights.exists():
        raise CheckpointError(f"checkpoint {weights} is missing")
    try:
        return st_load(weights.read_bytes())
    except (SafetensorError, ValueError, OSError) as exc:
        raise CheckpointError(f"checkpoint {weights} is corrupt or truncated ({exc})") from None


def load_weights(path_stem: Path, model: torch.nn.Module) -> torch.nn.Module:
    """Load weights into ``model`` (strict); CheckpointError on any mismatch."""
    state = load_state(path_stem)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {path_stem.with_suffix('.safetensors')} does not fit the model: {exc}"
        ) from None
    return model


def save_train_state(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_train_state(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise CheckpointError(f"training state {path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated/corrupt files
        raise CheckpointError(f"training state {path} is corrupt or truncated ({exc})") from None


def build_model(spec: dict[str, Any]) -> torch.nn.Module:
    """A registry model from the ``model`` spec a checkpoint's metadata records."""
    from generalist.models import create_model

    kwargs = {k: v for k, v in spec.items() if k != "name"}
    return create_model(spec["name"], **kwargs)


def load_model(path_stem: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model saved at ``path_stem`` (eval mode) and its metadata; CheckpointError if unusable."""
    meta = read_metadata(path_stem)
    return load_weights(path_stem, build_model(meta["model"])).eval(), meta
