"""The soft-target cache on disk: the ensemble's ``q`` for every example of a split.

One folder of shards of ``shard_size`` examples, plus a manifest written last::

    DIR/shard_00000.values.npy     dense: float16 (n, K) log q;  top-k: float16 (n, k) log of the largest q
    DIR/shard_00000.classes.npy    top-k only: int32 (n, k) their class ids (most probable first)
    DIR/shard_00000.residual.npy   top-k only: float32 (n,) the mass of the K - k classes not kept
    DIR/shard_00000.ids.npy        int64 (n,) example ids (positions in the split)
    DIR/manifest.json              written last, atomically: without it there is no cache

The layout is dense when ``K <= dense_max_classes``, else top-k. The cache stores ``q`` at
``T = 1``, never a softened copy: the reader softens at read time, ``softmax(log q / T)``
(:func:`distill.targets.soft_targets`), so one cache serves every temperature. A top-k row is
read back as its ``k`` stored probabilities plus the residual spread uniformly over the
``K - k`` classes not stored (:func:`distill.targets.complete_topk`, the maximum-entropy
completion with the right total mass).

Values are natural logarithms in float16 (format version 2). A confident teacher puts
probabilities of 1e-10 and below on most classes of a training example; at ``T = 4`` they are
``q ** (1 / 4)``, together a sizeable part of the softened mass, and float16 probabilities
(version 1) read them all as 0 (below ~6e-8). A float16 logarithm keeps them to a relative error of at most
``|log q| * 2**-11`` (0.3 % at ``q = 0.5``, 1.1 % at ``q = 1e-10``). Exact zeros are stored as
``-inf`` and stay exactly 0 at every temperature.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

FORMAT, FORMAT_VERSION = "specdistill.soft_target_cache", 2
MANIFEST = "manifest.json"
DENSE, TOPK = "dense", "topk"
SHARD = "shard_{:05d}.{}.npy"
SHARD_FILE = re.compile(r"shard_\d{5}\.(values|classes|residual|ids)\.npy")
DTYPES = {"values": np.float16, "classes": np.int32, "residual": np.float32, "ids": np.int64}
BUILD_COMMAND = "specdistill run CONFIG --from ensemble"
_SOFTEN = "stores q at T=1; soften at read time: softmax(log q / T)"
_TOPK_READ = ("top-k rows are read back as the k stored probabilities plus the residual spread "
              "uniformly over the K - k classes not stored")


class CacheMismatchError(ValueError):
    """The cache was built for other data or classes than the caller's (the message says which)."""


class CacheCorruptError(ValueError):
    """A cache file disagrees with the manifest (shape, dtype, checksum, example ids)."""


@dataclass(frozen=True)
class CacheLayout:
    """How each example's ``q (K,)`` is stored: ``dense`` (all ``K`` as float16) or ``topk``
    (the ``top_k`` largest as float16, their int32 class ids and the float32 residual mass)."""

    kind: str  # DENSE or TOPK
    num_classes: int  # K
    top_k: int  # k stored per example; K when dense

    @classmethod
    def choose(cls, num_classes: int, top_k: int, dense_max_classes: int) -> CacheLayout:
        """``dense`` when ``K <= dense_max_classes``, else ``topk`` with ``min(top_k, K)`` kept."""
        if num_classes <= dense_max_classes:
            return cls(DENSE, num_classes, num_classes)
        return cls(TOPK, num_classes, min(top_k, num_classes))

    @property
    def arrays(self) -> tuple[str, ...]:
        """The arrays of each shard, ``ids`` last."""
        return ("values", "ids") if self.kind == DENSE else ("values", "classes", "residual", "ids")

    def shapes(self, rows: int) -> dict[str, tuple[int, ...]]:
        """Shape of each array of a shard of ``rows`` examples."""
        shapes = {"values": (rows, self.top_k), "classes": (rows, self.top_k), "residual": (rows,), "ids": (rows,)}
        return {name: shapes[name] for name in self.arrays}

    @property
    def bytes_per_example(self) -> int:
        """Stored bytes per example (array payload, ids included; .npy headers excluded)."""
        return sum(int(np.prod(shape)) * np.dtype(DTYPES[name]).itemsize
                   for name, shape in self.shapes(1).items())

    def encode(self, q: Tensor) -> dict[str, np.ndarray]:
        """The stored arrays (all but ``ids``) of ``(n, K)`` probabilities ``q``."""
        q = q.detach().to("cpu", torch.float64)
        if self.kind == DENSE:
            return {"values": log_values(q)}
        values, classes = q.topk(self.top_k, dim=1)  # (n, k) each, most probable first
        rest = q.scatter(1, classes, 0.0).sum(dim=1)  # (n,) the exact mass of the classes not kept
        return {"values": log_values(values), "classes": classes.numpy().astype(np.int32),
                "residual": rest.numpy().astype(np.float32)}


def log_values(q: Tensor) -> np.ndarray:
    """The stored form of probabilities ``q``: float16 natural logarithms, ``-inf`` for exact zeros."""
    return q.to(torch.float64).log().numpy().astype(np.float16)


def probabilities(values: np.ndarray) -> Tensor:
    """float32 probabilities of stored float16 logarithms (``-inf`` reads as exactly 0)."""
    return torch.from_numpy(np.asarray(values)).float().exp()


def cache_manifest(layout: CacheLayout, *, shards: list[dict[str, Any]], shard_size: int,
                   teacher: Mapping[str, Any], identity: Mapping[str, Any], class_names: Sequence[str],
                   file_bytes: int, started: float, extra: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest of a cache whose ``shards`` (index, first_id, count, files, sha256) are written.

    ``teacher`` and ``identity`` name the teacher and the split (the reader checks the latter);
    ``started`` is the ``time.perf_counter()`` of the start of the build; ``extra`` holds
    settings of the build to record (e.g. the actor pool).
    """
    n = sum(int(s["count"]) for s in shards)
    seconds = time.perf_counter() - started
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "layout": layout.kind,
        "num_classes": layout.num_classes,
        "top_k": layout.top_k,
        "dtypes": {name: np.dtype(DTYPES[name]).name for name in layout.arrays},
        "split": identity["split"],
        "n_examples": n,
        "shard_size": shard_size,
        "shards": shards,
        "teacher": dict(teacher),
        "data": dict(identity),
        "class_names": list(class_names),
        "targets": _SOFTEN,
        "values": "natural logarithms of q (float16; -inf = exactly 0)",
        "reconstruction": _TOPK_READ if layout.kind == TOPK else "dense: q itself",
        "bytes_per_example": layout.bytes_per_example,
        "file_bytes": file_bytes,
        "seconds": round(seconds, 3),
        "examples_per_s": round(n / max(seconds, 1e-9), 3),
        **extra,
        "created": time.time(),
    }


def layout_of(manifest: Mapping[str, Any]) -> CacheLayout:
    """The layout a manifest records."""
    return CacheLayout(manifest["layout"], int(manifest["num_classes"]), int(manifest["top_k"]))
