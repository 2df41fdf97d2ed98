"""Writing a soft-target cache (:mod:`specialists.ensemble.cache_format`): shards from batches
of encoded rows arriving in any order, then the manifest, last and atomically.

:func:`write_cache` writes the cache of probabilities computed in this process (another
teacher, a benchmark); ``orchestration.soft_cache.build_cache`` computes the ensemble's ``q``
with Ray Data and hands its batches to :func:`write_shards`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from specialists.ensemble.cache_format import (
    DTYPES,
    MANIFEST,
    SHARD,
    SHARD_FILE,
    CacheLayout,
    cache_manifest,
)

Progress = Callable[[str], None]
"""Where to report one line per written shard (e.g. ``console.print``)."""

_ENCODE_ROWS = 4096  # rows of q encoded at a time by write_cache


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes (what the manifest records per shard file)."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_cache(
    out_dir: str | Path,
    q: Tensor | np.ndarray,
    *,
    class_names: Sequence[str],
    identity: Mapping[str, Any],
    teacher: Mapping[str, Any],
    top_k: int = 32,
    dense_max_classes: int = 1024,
    shard_size: int = 8192,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write the cache of probabilities computed elsewhere (another teacher, a benchmark).

    ``q`` is ``(N, K)`` probabilities, row i for example id i of the split ``identity`` names
    (``identity["n_examples"] == N``); ``teacher`` is recorded in the manifest as the teacher's
    identity. Same files, layout and manifest as the ensemble stage's cache; returns the manifest.
    """
    started = time.perf_counter()
    q = torch.as_tensor(q)
    if q.dim() != 2 or q.shape[1] != len(class_names) or q.shape[0] != identity["n_examples"]:
        raise ValueError(f"q must be (N={identity['n_examples']}, K={len(class_names)}) probabilities "
                         f"(one row per example of the split, one column per class), got {tuple(q.shape)}")
    check_count("shard_size", shard_size)
    n = int(q.shape[0])
    layout = CacheLayout.choose(int(q.shape[1]), top_k, dense_max_classes)
    batches = ({"id": np.arange(start, min(start + _ENCODE_ROWS, n)),
                **layout.encode(q[start:start + _ENCODE_ROWS])} for start in range(0, n, _ENCODE_ROWS))
    return write_shards(Path(out_dir), batches, layout, n=n, shard_size=shard_size, teacher=teacher,
                        identity=identity, class_names=class_names, progress=progress, started=started)


def check_count(name: str, value: object) -> None:
    """``ValueError`` unless ``value`` is an int >= 1 (a size or count option)."""
    if not (isinstance(value, int) and value >= 1):
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def write_shards(out: Path, batches: Iterable[Mapping[str, np.ndarray]], layout: CacheLayout, *, n: int,
                 shard_size: int, teacher: Mapping[str, Any], identity: Mapping[str, Any],
                 class_names: Sequence[str], progress: Progress | None, started: float,
                 extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Shards of ``n`` examples from ``batches`` (``id (b,)`` + ``layout.encode`` arrays, ids in
    any order, each exactly once), then the manifest, last; returns the manifest.

    An older cache in ``out`` is replaced: its manifest goes first, its extra shards at the end.
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # from here on the old cache is gone
    writer = ShardWriter(out, n, shard_size, layout, progress, started)
    for batch in batches:
        writer.add(batch)
    shards = writer.finish()
    _remove_stale(out, shards)
    manifest = cache_manifest(
        layout, shards=shards, shard_size=shard_size, teacher=teacher, identity=identity,
        class_names=[str(c) for c in class_names], started=started, extra=extra or {},
        file_bytes=sum((out / f).stat().st_size for s in shards for f in s["files"].values()))
    _write_json_atomically(out / MANIFEST, manifest)  # last: now the cache exists
    return manifest


class ShardWriter:
    """Collects rows arriving in any order; writes each shard once it and all before it are full."""

    def __init__(self, out: Path, n: int, shard_size: int, layout: CacheLayout,
                 progress: Progress | None, started: float) -> None:
        self.out, self.n, self.size, self.layout = out, n, shard_size, layout
        self.progress, self.started = progress, started
        self.count = math.ceil(n / shard_size)
        self.pending: dict[int, dict[str, np.ndarray]] = {}  # shard -> its arrays being filled
        self.filled = np.zeros(self.count, dtype=np.int64)  # (shards,) rows received per shard
        self.seen = np.zeros(n, dtype=bool)  # (n,) example ids received
        self.next = 0  # the first shard not written yet
        self.written: list[dict[str, Any]] = []

    def _rows(self, shard: int) -> int:
        return min(self.size, self.n - shard * self.size)

    def _buffer(self, shard: int) -> dict[str, np.ndarray]:
        if shard not in self.pending:
            shapes = self.layout.shapes(self._rows(shard))
            self.pending[shard] = {name: np.empty(shape, DTYPES[name]) for name, shape in shapes.items()}
        return self.pending[shard]

    def add(self, batch: Mapping[str, np.ndarray]) -> None:
        """Take the rows of one batch; write every shard that is now complete, in order."""
        ids = np.asarray(batch["id"], dtype=np.int64)  # (b,)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n or self.seen[ids].any()
                         or len(np.unique(ids)) != ids.size):
            raise RuntimeError("Ray Data returned an example id twice or out of range; the cache "
                               "was not written (run the stage again)")
        self.seen[ids] = True
        shard_of = ids // self.size
        for shard in np.unique(shard_of):
            mask = shard_of == shard
            rows = ids[mask] - shard * self.size
            buffer = self._buffer(int(shard))
            buffer["ids"][rows] = ids[mask]
            for name in self.layout.arrays:
                if name != "ids":
                    buffer[name][rows] = batch[name][mask]
            self.filled[shard] += int(mask.sum())
        while self.next < self.count and self.filled[self.next] == self._rows(self.next):
            self._write(self.next)
            self.next += 1

    def _write(self, shard: int) -> None:
        arrays = self.pending.pop(shard)
        files, sums = {}, {}
        for name in self.layout.arrays:
            files[name] = SHARD.format(shard, name)
            np.save(self.out / files[name], arrays[name], allow_pickle=False)
            sums[name] = sha256_file(self.out / files[name])
        first, rows = shard * self.size, self._rows(shard)
        self.written.append({"index": shard, "first_id": first, "count": rows,
                             "files": files, "sha256": sums})
        if self.progress is not None:
            self.progress(f"  cache shard {shard + 1}/{self.count}: examples {first:,}..{first + rows - 1:,} "
                          f"written ({time.perf_counter() - self.started:.1f}s)")

    def finish(self) -> list[dict[str, Any]]:
        """The records of every shard; ``RuntimeError`` if some example never arrived."""
        if self.next != self.count:
            missing = int((~self.seen).sum())
            raise RuntimeError(f"Ray Data returned no soft targets for {missing} of {self.n} examples; "
                               "the cache was not written (run the stage again)")
        return self.written


def _remove_stale(out: Path, shards: list[dict[str, Any]]) -> None:
    """Shard files of an older, larger cache in the same folder."""
    keep = {f for s in shards for f in s["files"].values()}
    for path in out.iterdir():
        if SHARD_FILE.fullmatch(path.name) and path.name not in keep:
            path.unlink()


def _write_json_atomically(path: Path, data: Mapping[str, Any]) -> None:
    """Readers see no file or the whole file: write a temporary file, then rename it."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w") as handle:
            handle.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
