"""The identity of data on disk, one of the inputs of the pipeline's skip decision.

Built-in data sets (``glyphs``, ``hierarchy``) are made from the config alone: the config hash
pins them. Data a user brings (``image_folder``, CIFAR, the MNIST family) can change under the
same config, e.g. a class folder added or an image replaced. Its identity is the list of files
it is read from, each with its path under ``data.root``, its size and its modification time
(``stat`` only, nothing is decoded), or with ``data.verify_content`` its sha256 instead of the
time (every file is read). Packed data (``data.name=packed``) is pinned by its manifest: the
sha256 of every shard and class index it lists (only the manifest is read, local or remote).
Every stage takes it as its input ``data``
(:func:`orchestration.pipeline.stage_fingerprint`), so changed data re-runs what depends on it.
Data sets registered elsewhere are pinned by their config alone.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from generalist.data.external import CIFAR, MNIST_LIKE, source_files
from generalist.data.image_folder import tree_files
from generalist.registry import normalise_name
from orchestration.files import sha256_file

if TYPE_CHECKING:
    from orchestration.config import Config


def data_files(config: Config) -> tuple[Path, list[Path]] | None:
    """``(root, files)`` the configured data is read from; None for data made from the config
    alone. DataError (naming the folder and the fix) when the files are not there."""
    name, root = normalise_name(config.data.name), config.data.root
    if name == "image_folder":
        files = tree_files(root)
    elif name in CIFAR or name in MNIST_LIKE:
        files = source_files(name, root)
    else:
        return None
    return Path(os.path.expanduser(str(root))), files


def data_fingerprint(config: Config) -> str | None:
    """sha256 of the data's file list (see the module docstring); None for built-in data."""
    if normalise_name(config.data.name) == "packed":
        return packed_fingerprint(config.data.root)
    found = data_files(config)
    if found is None:
        return None
    root, files = found
    entries = [_entry(root, path, config.data.verify_content) for path in files]
    blob = json.dumps({"files": entries, "content": config.data.verify_content}, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def packed_fingerprint(root: str | None) -> str:
    """sha256 of the checksums a packed set's manifest lists (see the module docstring)."""
    from generalist.data.packed import require_root
    from generalist.data.packed_format import read_manifest
    from generalist.data.storage import Storage

    manifest = read_manifest(Storage.open(require_root(root)))
    sums = {split: {"shards": [s["sha256"] for s in entry["shards"]], "index": entry["index"]["sha256"]}
            for split, entry in sorted(manifest["splits"].items())}
    return hashlib.sha256(json.dumps({"packed": sums}, sort_keys=True).encode()).hexdigest()


def _entry(root: Path, path: Path, content: bool) -> list[str | int]:
    stat = path.stat()
    rel = path.relative_to(root).as_posix()
    return [rel, stat.st_size, sha256_file(path) if content else stat.st_mtime_ns]
