"""Reading a soft-target cache (:mod:`specialists.ensemble.cache_format`), memory-mapped::

    cache = SoftTargetCache("runs/quickstart/ensemble/cache")
    cache.check_compatible(class_names, identity)       # built for this data?
    targets = cache.targets(batch_indices, temperature=4.0)  # (B, K) float32, rows sum to 1
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from distill.targets import check_temperature, complete_topk, soft_targets
from specialists.ensemble.cache_format import (
    BUILD_COMMAND,
    DENSE,
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SHARD_FILE,
    CacheCorruptError,
    CacheMismatchError,
    layout_of,
    probabilities,
)
from specialists.ensemble.cache_writer import sha256_file


class SoftTargetCache(Dataset):
    """A built cache, memory-mapped: ``cache[i]`` is example ``i``'s ``q`` as float32 ``(K,)``.

    :meth:`targets` reads a batch softened at temperature ``T``. Opening reads only the manifest
    and the ``.npy`` headers; :meth:`verify` checks every shard's sha256 and example ids.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest: dict[str, Any] = _read_manifest(self.path)
        self._layout = layout_of(self.manifest)
        self.layout: str = self._layout.kind  # "dense" or "topk"
        self.class_names: list[str] = list(self.manifest["class_names"])
        self.num_classes: int = self._layout.num_classes
        self.top_k: int = self._layout.top_k
        self.bytes_per_example: int = int(self.manifest["bytes_per_example"])
        self._shards = [self._open(shard) for shard in self.manifest["shards"]]
        self._starts = np.array([s["first_id"] for s in self.manifest["shards"]], dtype=np.int64)
        self._len = int(self.manifest["n_examples"])

    def _open(self, shard: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The shard's arrays, memory-mapped, checked against the manifest's shapes and dtypes."""
        arrays = {}
        for name, shape in self._layout.shapes(int(shard["count"])).items():
            file = self.path / shard["files"][name]
            if not file.exists():
                raise FileNotFoundError(f"{file} is missing from the soft-target cache {self.path}; "
                                        f"rebuild it: {BUILD_COMMAND}")
            array = np.load(file, mmap_mode="r", allow_pickle=False)
            if array.shape != shape or array.dtype != DTYPES[name]:
                raise CacheCorruptError(
                    f"{file} holds {array.dtype} {array.shape}, the manifest says "
                    f"{np.dtype(DTYPES[name]).name} {shape}; rebuild the cache: {BUILD_COMMAND}")
            arrays[name] = array
        return arrays

    # Workers of a DataLoader started with spawn get the path and map the files themselves.
    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> Tensor:
        if not -self._len <= index < self._len:
            raise IndexError(f"example {index} is out of range for a cache of {self._len} examples")
        return self.targets(torch.tensor([index % self._len]))[0]

    def __repr__(self) -> str:
        return (f"SoftTargetCache({str(self.path)!r}: {self._len} examples, {self.layout}, "
                f"K={self.num_classes}, {self.bytes_per_example} bytes/example)")

    @property
    def data_identity(self) -> dict[str, Any]:
        return dict(self.manifest["data"])

    def check_compatible(self, class_names: Sequence[str], data_identity: Mapping[str, Any]) -> None:
        """Raise :class:`CacheMismatchError` naming every difference from the caller's data."""
        problems = _data_differences(self.manifest["data"], data_identity)
        problems += _class_differences(self.class_names, [str(c) for c in class_names])
        if problems:
            raise CacheMismatchError(
                f"the soft-target cache {self.path} was built for {'; '.join(problems)}; rebuild it "
                f"for this data: {BUILD_COMMAND}")

    def targets(self, indices: Tensor | Sequence[int], temperature: float = 1.0) -> Tensor:
        """``(B, K)`` float32 ``softmax(log q / T)`` of the examples ``indices`` (any order, repeats
        ok); entries stored as 0 stay 0."""
        check_temperature(temperature)
        return soft_targets(self._gather(indices), temperature)

    def _gather(self, indices: Tensor | Sequence[int]) -> Tensor:
        """``(B, K)`` float32 ``q`` as stored (top-k rows completed with the spread residual)."""
        idx = torch.as_tensor(indices).reshape(-1).cpu().numpy()
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"indices must be integers, got {idx.dtype}")
        idx = idx.astype(np.int64, copy=False)
        if idx.size and (idx.min() < 0 or idx.max() >= self._len):
            raise IndexError(f"example ids must lie in [0, {self._len}), got {int(idx.min())}..{int(idx.max())}")
        names = [name for name in self._layout.arrays if name != "ids"]
        shapes = self._layout.shapes(idx.size)
        rows = {name: np.empty(shapes[name], DTYPES[name]) for name in names}  # the stored rows, batch order
        shard_of = np.searchsorted(self._starts, idx, side="right") - 1
        for shard in np.unique(shard_of):
            mask = shard_of == shard
            for name in names:
                rows[name][mask] = self._shards[shard][name][idx[mask] - self._starts[shard]]
        values = probabilities(rows["values"])  # (B, K) dense, (B, k) top-k
        if self.layout == DENSE:
            return values
        return complete_topk(values, torch.from_numpy(rows["classes"]).long(), self.num_classes,
                             torch.from_numpy(rows["residual"]))

    def verify(self) -> None:
        """Check every shard file's sha256 and example ids against the manifest (reads everything)."""
        for shard, arrays in zip(self.manifest["shards"], self._shards, strict=True):
            for name, file in shard["files"].items():
                if sha256_file(self.path / file) != shard["sha256"][name]:
                    raise CacheCorruptError(f"{self.path / file} changed since the cache was built "
                                            f"(sha256 differs); rebuild it: {BUILD_COMMAND}")
            expected = np.arange(shard["first_id"], shard["first_id"] + shard["count"])
            if not np.array_equal(arrays["ids"], expected):
                raise CacheCorruptError(f"shard {shard['index']} of {self.path} holds other example "
                                        f"ids than {expected[0]}..{expected[-1]}; rebuild it: {BUILD_COMMAND}")


def _read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the cache at ``path``, checked to be this format's."""
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise FileNotFoundError(_missing(path))
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise CacheCorruptError(
            f"{manifest_path} is not a version-{FORMAT_VERSION} soft-target cache manifest "
            f"(format {manifest.get('format')!r}, version {manifest.get('format_version')!r}); "
            f"rebuild it: {BUILD_COMMAND}")
    return manifest


def _missing(path: Path) -> str:
    if path.is_dir() and any(SHARD_FILE.fullmatch(p.name) for p in path.iterdir()):
        return (f"the soft-target cache {path} is half-written (shards but no {MANIFEST}: its build "
                f"was interrupted); rebuild it with `{BUILD_COMMAND}` (ensemble.cache.enabled=true)")
    return (f"no soft-target cache at {path} (no {MANIFEST}); build it with `{BUILD_COMMAND}` "
            "(ensemble.cache.enabled=true, ensemble.cache.split = the split you need)")


def _data_differences(stored: Mapping[str, Any], ours: Mapping[str, Any]) -> list[str]:
    """What differs between the data identity a cache was built for and the caller's."""
    problems = []
    if stored.get("name") != ours.get("name"):
        problems.append(f"another data set ({stored.get('name')!r}, not {ours.get('name')!r})")
    if stored.get("options") != ours.get("options"):
        theirs, mine = stored.get("options") or {}, ours.get("options") or {}
        keys = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
        problems.append(f"other data options (differing: {', '.join(keys)})")
    for key, what in (("seed", "another run.seed"), ("split", "another split")):
        if stored.get(key) != ours.get(key):
            problems.append(f"{what} ({stored.get(key)!r}, not {ours.get(key)!r})")
    if stored.get("n_examples") != ours.get("n_examples"):
        problems.append(f"another number of examples ({stored.get('n_examples')}, not {ours.get('n_examples')})")
    elif stored.get("labels_sha256") != ours.get("labels_sha256"):
        problems.append("other labels for the same number of examples")
    return problems


def _class_differences(stored: list[str], names: list[str]) -> list[str]:
    """The first difference between the cache's class list and the caller's, if any."""
    if names == stored:
        return []
    if len(names) != len(stored):
        return [f"another class list ({len(stored)} classes, not {len(names)})"]
    i = next(i for i, (a, b) in enumerate(zip(stored, names, strict=True)) if a != b)
    return [f"another class list (class {i} is {stored[i]!r}, not {names[i]!r})"]
