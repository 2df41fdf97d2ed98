"""The run directory: stage folders, atomic writes, and stage manifests.

Layout::

    RUN/config.yaml                  the fully resolved config of the latest invocation
    RUN/run.json                     MLflow parent run id and experiment
    RUN/<stage>/...                  the stage's outputs (and checkpoints while it runs)
    RUN/<stage>/manifest.json        written last, atomically: the stage is done

A manifest records the stage, the hash of the config keys the stage depends on, the hashes of
its input manifests, its output files with sha256 checksums, and its metrics. A stage is
skipped when its manifest exists, both hashes match, and every output is intact.
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


@dataclass(frozen=True)
class Manifest:
    stage: str
    config_hash: str
    inputs: dict[str, str]          # upstream stage -> its manifest's digest
    outputs: dict[str, str]         # path relative to the stage dir -> sha256
    metrics: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "config_hash": self.config_hash,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "metrics": self.metrics,
            "details": self.details,
            "created": self.created,
        }

    @property
    def digest(self) -> str:
        """Identity of the stage's result: config, inputs and output checksums (not the time)."""
        blob = json.dumps([self.stage, self.config_hash, self.inputs, self.outputs], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


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
        path = self.manifest_path(stage)
        if not path.exists():
            return None
        try:
            return Manifest(**read_json(path))
        except (json.JSONDecodeError, TypeError):
            return None

    def write_manifest(
        self,
        stage: str,
        *,
        config_hash: str,
        inputs: Mapping[str, str],
        outputs: Iterable[str],
        metrics: Mapping[str, Any],
        details: Mapping[str, Any] | None = None,
    ) -> Manifest:
        stage_dir = self.stage_dir(stage)
        checksums = {rel: sha256_file(stage_dir / rel) for rel in sorted(outputs)}
        manifest = Manifest(
            stage=stage,
            config_hash=config_hash,
            inputs=dict(inputs),
            outputs=checksums,
            metrics=dict(metrics),
            details=dict(details or {}),
            created=time.time(),
        )
        write_json(self.manifest_path(stage), manifest.to_dict())
        return manifest

    def invalidate(self, stage: str) -> None:
        self.manifest_path(stage).unlink(missing_ok=True)

    def is_complete(self, stage: str, config_hash: str, inputs: Mapping[str, str]) -> str | None:
        """None when the stage's manifest matches and its outputs are intact, else the reason."""
        manifest = self.read_manifest(stage)
        if manifest is None:
            return "no manifest"
        if manifest.config_hash != config_hash:
            return "config changed"
        if manifest.inputs != dict(inputs):
            return "inputs changed"
        for rel, checksum in manifest.outputs.items():
            path = self.path / stage / rel
            if not path.exists():
                return f"output {rel} missing"
            if sha256_file(path) != checksum:
                return f"output {rel} changed or corrupt"
        return None
