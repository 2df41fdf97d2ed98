"""Checkpoints that never unpickle: weights in safetensors, metadata in JSON.

A model checkpoint is a pair ``NAME.safetensors`` + ``NAME.json`` (architecture, its keyword
arguments, class names, and anything else the stage records): the files a stage hands on.
Resumable training state is one :class:`Checkpointer` per training loop (generalist,
specialists, students, the data-free generator): per-epoch snapshot folders with the weights in
safetensors and the optimizer / scheduler / early-stopping state saved with ``torch.save`` and
read back with ``torch.load(weights_only=True)``. Every write is atomic.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from orchestration.files import atomic_write_bytes, read_json, write_json


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
    except ValueError as exc:  # not JSON, or not text at all
        raise CheckpointError(f"checkpoint metadata {meta} is corrupt ({exc})") from None


def load_state(path_stem: Path) -> dict[str, torch.Tensor]:
    weights = path_stem.with_suffix(".safetensors")
    if not weights.exists():
        raise CheckpointError(f"checkpoint {weights} is missing")
    try:
        return st_load(weights.read_bytes())
    except (SafetensorError, ValueError, OSError) as exc:
        raise CheckpointError(f"checkpoint {weights} is corrupt or truncated ({exc})") from None


def verify_model_files(path_stem: Path) -> None:
    """CheckpointError unless ``NAME.json`` parses and ``NAME.safetensors`` is whole: its header
    reads and its tensors cover the file exactly (a truncated or padded file fails). Reads the
    header only, not the weights: what a stage checks before it calls its outputs finished."""
    read_metadata(path_stem)
    weights = path_stem.with_suffix(".safetensors")
    if not weights.exists():
        raise CheckpointError(f"checkpoint {weights} is missing")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as exc:
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


SNAPSHOT_MODEL, STATE = "model", "state.pt"   # model.safetensors + model.json, state.pt
LATEST, BEST = "latest.json", "best.json"


@dataclass(frozen=True)
class Snapshot:
    """What :meth:`Checkpointer.resume` restored: the epoch it was taken after, the loop's own
    extra state (plain Python / tensors) and the snapshot's metadata."""

    epoch: int
    extra: dict[str, Any]
    metadata: dict[str, Any]


class Checkpointer:
    """Resumable training state of one training loop, in one folder, one format::

        FOLDER/epoch_0003/model.safetensors   the trained module's weights after epoch 3
        FOLDER/epoch_0003/state.pt            state_dict() of every stateful object (optimizer,
                                              scheduler, early stopping, ...) + the loop's extra
                                              state; torch.save, read with weights_only=True
        FOLDER/epoch_0003/model.json          {"epoch": 3, ...metadata}
        FOLDER/latest.json                    {"epoch": 3, "dir": "epoch_0003"}: written last,
                                              atomically; a snapshot exists once it names it
        FOLDER/best.json                      the same for the best epoch (loops that track one)

    Every file is written atomically and only the latest and the best snapshot are kept. An
    ``epoch_NNNN`` folder is self-contained, so it is also what a Ray Train worker reports as a
    ``ray.train.Checkpoint`` (:meth:`latest_dir`) and restores with :func:`load_snapshot`.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def save(self, epoch: int, module: torch.nn.Module, stateful: Mapping[str, Any], *,
             extra: Mapping[str, Any] | None = None, metadata: Mapping[str, Any] | None = None,
             best: bool = False) -> Path:
        """Snapshot after ``epoch`` (1-based); ``best`` also points best.json at it."""
        path = self.folder / f"epoch_{epoch:04d}"
        write_snapshot(path, epoch, module, stateful, extra=extra, metadata=metadata)
        pointer = {"epoch": epoch, "dir": path.name}
        if best:
            write_json(self.folder / BEST, pointer)
        write_json(self.folder / LATEST, pointer)
        self._prune()
        return path

    def exists(self) -> bool:
        return (self.folder / LATEST).exists()

    def latest_dir(self) -> Path | None:
        return self._pointed(LATEST)

    def latest_epoch(self) -> int:
        """The epoch of the latest snapshot (0 when there is none)."""
        pointer = self.folder / LATEST
        return int(read_json(pointer)["epoch"]) if pointer.exists() else 0

    def best_dir(self) -> Path | None:
        return self._pointed(BEST)

    def resume(self, module: torch.nn.Module, stateful: Mapping[str, Any]) -> Snapshot | None:
        """Load the latest snapshot into ``module`` and ``stateful``; None when there is none.
        CheckpointError when it is corrupt or does not fit (the caller restarts the loop)."""
        path = self.latest_dir()
        return None if path is None else load_snapshot(path, module, stateful)

    def resume_or_restart(self, module: torch.nn.Module, stateful: Mapping[str, Any], *,
                          clear: bool = True) -> tuple[Snapshot | None, CheckpointError | None]:
        """:meth:`resume`, or when the snapshot is corrupt ``module`` and ``stateful`` put back as
        they were and (with ``clear``; on one rank of many) the snapshots deleted, so the loop
        starts again from its initial state: ``(snapshot or None, the error or None)``."""
        initial = {k: v.clone() for k, v in module.state_dict().items()}
        initial_state = {name: obj.state_dict() for name, obj in stateful.items()}
        try:
            return self.resume(module, stateful), None
        except CheckpointError as exc:
            if clear:
                self.clear()
            module.load_state_dict(initial)
            for name, obj in stateful.items():
                obj.load_state_dict(initial_state[name])
            return None, exc

    def load_best(self, module: torch.nn.Module) -> int:
        """Load the best snapshot's weights into ``module``; returns its epoch."""
        path = self.best_dir()
        if path is None:
            raise CheckpointError(f"no best snapshot in {self.folder} ({BEST} is missing)")
        load_weights(path / SNAPSHOT_MODEL, module)
        return int(_read_meta(path)["epoch"])

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def _pointed(self, name: str) -> Path | None:
        pointer = self.folder / name
        if not pointer.exists():
            return None
        try:
            return self.folder / str(read_json(pointer)["dir"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"checkpoint pointer {pointer} is corrupt ({exc})") from None

    def _prune(self) -> None:
        keep = {p.name for p in (self.latest_dir(), self.best_dir()) if p is not None}
        for path in self.folder.glob("epoch_*"):
            if path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)


def write_snapshot(path: Path, epoch: int, module: torch.nn.Module, stateful: Mapping[str, Any], *,
                   extra: Mapping[str, Any] | None = None, metadata: Mapping[str, Any] | None = None) -> None:
    """One self-contained snapshot folder (see :class:`Checkpointer`)."""
    state = {"epoch": epoch, "extra": dict(extra or {}),
             "stateful": {name: obj.state_dict() for name, obj in stateful.items()}}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path / STATE, buffer.getvalue())
    save_model(path / SNAPSHOT_MODEL, module, {"epoch": epoch, **dict(metadata or {})})


def load_snapshot(path: Path, module: torch.nn.Module, stateful: Mapping[str, Any]) -> Snapshot:
    """Restore a snapshot folder into ``module`` and ``stateful``; CheckpointError if unusable."""
    state = _read_state(path / STATE)
    load_weights(path / SNAPSHOT_MODEL, module)
    try:
        for name, obj in stateful.items():
            obj.load_state_dict(state["stateful"][name])
        return Snapshot(int(state["epoch"]), dict(state["extra"]), _read_meta(path))
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"snapshot {path} does not fit this training loop ({exc!r})") from None


def _read_meta(path: Path) -> dict[str, Any]:
    return read_metadata(path / SNAPSHOT_MODEL)


def _read_state(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise CheckpointError(f"training state {path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for truncated/corrupt files
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
