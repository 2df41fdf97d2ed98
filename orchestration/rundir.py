"""The run directory: stage folders, atomic writes, and stage manifests.

Layout::

    RUN/config.yaml                  the fully resolved config of the latest invocation
    RUN/run.json                     MLflow parent run id and experiment
    RUN/<stage>/...                  the stage's outputs (and checkpoints while it runs)
    RUN/<stage>/manifest.json        written last, atomically: the stage is done

A manifest records the stage, the hash of the config keys the stage depends on (and their
values), the digests of its inputs (upstream manifests, and the data on disk for external data
sets), its output files with sha256 checksums, and its metrics. A stage is skipped when its
manifest exists, both match, and every output is intact.

What downstream stages are fingerprinted by is :attr:`Manifest.digest`: the config hash, the
inputs and the outputs' *identity* checksums, where a JSON output's identity leaves out what
differs between two runs that make the same result (timings, metrics, MLflow ids, creation
times: :data:`VOLATILE_KEYS`). A stage that re-runs and writes the same model therefore leaves
its downstream stages finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestration.artifacts import MANIFEST
from orchestration.files import RunDirError, read_json, sha256_file, write_json

# JSON keys (at any depth) left out of an output's identity: measurements and bookkeeping that
# differ between two runs making the same result.
VOLATILE_KEYS = frozenset({
    "metrics", "history", "created", "seconds", "stage_seconds", "examples_per_s", "latency_ms",
    "mlflow_run_id", "resumed_from_epochs",
})


class ManifestError(RunDirError):
    """A stage's manifest exists but cannot be read (not JSON, or a field of the wrong type)."""


@dataclass(frozen=True)
class Manifest:
    stage: str
    config_hash: str
    inputs: dict[str, str]          # upstream stage (or "data") -> its digest
    outputs: dict[str, str]         # path relative to the stage dir -> sha256
    metrics: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0
    identity: dict[str, str] = field(default_factory=dict)   # output -> identity checksum
    config: dict[str, Any] = field(default_factory=dict)     # the stage's config keys -> values

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _FIELDS}

    @classmethod
    def from_dict(cls, data: Any, path: Path) -> Manifest:
        """The manifest in ``data`` (read from ``path``); ManifestError naming the bad field."""
        if not isinstance(data, dict):
            raise ManifestError(f"manifest {path} is corrupt: it holds a JSON {type(data).__name__}, "
                                "not an object")
        missing = [name for name in _REQUIRED if name not in data]
        unknown = sorted(set(data) - set(_FIELDS))
        if missing or unknown:
            what = f"lacks {', '.join(missing)}" if missing else f"has unknown fields {', '.join(unknown)}"
            raise ManifestError(f"manifest {path} is corrupt: it {what}")
        for name, value in data.items():
            problem = _field_problem(name, value)
            if problem:
                raise ManifestError(f"manifest {path} is corrupt: field '{name}' {problem}, got {value!r:.80}")
        return cls(**data)

    @property
    def digest(self) -> str:
        """Identity of the stage's result: config, inputs and output identities (not the time,
        the metrics or the timings); manifests written before identities existed use the
        outputs' checksums."""
        outputs = self.identity or self.outputs
        blob = json.dumps([self.stage, self.config_hash, self.inputs, outputs], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


_FIELDS = ("stage", "config_hash", "inputs", "outputs", "metrics", "details", "created", "identity",
           "config")
_REQUIRED = ("stage", "config_hash", "inputs", "outputs")
_CHECKSUM_MAPS = ("inputs", "outputs", "identity")


def _field_problem(name: str, value: Any) -> str | None:
    """What is wrong with manifest field ``name`` holding ``value`` (None: nothing)."""
    if name in ("stage", "config_hash"):
        return None if isinstance(value, str) else "must be a string"
    if name == "created":
        return None if isinstance(value, int | float) and not isinstance(value, bool) else "must be a number"
    if not isinstance(value, dict):
        return "must be a JSON object"
    if name in _CHECKSUM_MAPS and not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return "must map names to checksum strings"
    return None


def identity_checksum(path: Path) -> str:
    """sha256 of what ``path`` says, for fingerprints: a JSON file without :data:`VOLATILE_KEYS`
    (canonical form), any other file byte for byte."""
    if path.suffix != ".json":
        return sha256_file(path)
    try:
        data = json.loads(path.read_bytes())
    except ValueError:
        return sha256_file(path)
    blob = json.dumps(_without_volatile(data), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _without_volatile(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _without_volatile(v) for k, v in data.items() if k not in VOLATILE_KEYS}
    if isinstance(data, list):
        return [_without_volatile(v) for v in data]
    return data


class RunDir:
    """A run directory on the local filesystem."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def ensure_writable(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-probe-{os.getpid()}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise RunDirError(
                f"run directory {self.path} is not writable ({exc.strerror or exc}); "
                "choose another with run.dir=PATH or run.root=PATH, or free disk space"
            ) from None

    def stage_dir(self, stage: str) -> Path:
        path = self.path / stage
        path.mkdir(parents=True, exist_ok=True)
        return path

    def manifest_path(self, stage: str) -> Path:
        return self.path / stage / MANIFEST

    def read_manifest(self, stage: str) -> Manifest | None:
        """The stage's manifest; None when it has none; ManifestError when it is corrupt."""
        path = self.manifest_path(stage)
        if not path.exists():
            return None
        try:
            data = read_json(path)
        except ValueError as exc:  # not JSON (or not text)
            raise ManifestError(f"manifest {path} is corrupt: not valid JSON ({exc})") from None
        return Manifest.from_dict(data, path)

    def write_manifest(
        self,
        stage: str,
        *,
        config_hash: str,
        inputs: Mapping[str, str],
        outputs: Iterable[str],
        metrics: Mapping[str, Any],
        details: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> Manifest:
        stage_dir = self.stage_dir(stage)
        names = sorted(outputs)
        manifest = Manifest(
            stage=stage,
            config_hash=config_hash,
            inputs=dict(inputs),
            outputs={rel: sha256_file(stage_dir / rel) for rel in names},
            metrics=dict(metrics),
            details=dict(details or {}),
            created=time.time(),
            identity={rel: identity_checksum(stage_dir / rel) for rel in names},
            config=dict(config or {}),
        )
        write_json(self.manifest_path(stage), manifest.to_dict())
        return manifest

    def invalidate(self, stage: str) -> None:
        self.manifest_path(stage).unlink(missing_ok=True)

    def is_complete(self, stage: str, config_hash: str, inputs: Mapping[str, str]) -> str | None:
        """None when the stage's manifest matches and its outputs are intact, else the reason."""
        try:
            manifest = self.read_manifest(stage)
        except ManifestError as exc:
            return str(exc)
        if manifest is None:
            return "no manifest"
        if manifest.config_hash != config_hash:
            return "config changed"
        if manifest.inputs != dict(inputs):
            changed = {k for k in {*manifest.inputs, *inputs} if manifest.inputs.get(k) != inputs.get(k)}
            return "data changed" if changed == {"data"} else "inputs changed"
        for rel, checksum in manifest.outputs.items():
            path = self.path / stage / rel
            if not path.exists():
                return f"output {rel} missing"
            if sha256_file(path) != checksum:
                return f"output {rel} changed or corrupt"
        return None
