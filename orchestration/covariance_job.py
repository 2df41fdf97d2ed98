"""The clustering stage's pass over the holdout split, block by block on Ray Data.

The holdout positions are cut into blocks; a Ray Data dataset of block starts goes through
``map_batches`` with a pool of actors, each holding the run's generalist (on the GPU Ray gave it,
else on one CPU thread) and the split's source (:mod:`orchestration.data_access`: in-memory
arrays shared once through the object store, or a streaming source that re-opens its files).
An actor reads its block with ``take`` in batches of ``clustering.batch_size``, scores it, and
returns the block's partial statistics, a :class:`HoldoutPartial`: count, mean and centred
scatter of the predictions (or the sparse top-k co-prediction for very large K), the soft
confusion and co-prediction of the two halves of the examples the affinities are fitted on, and
the hard confusion counts. The driver merges the blocks in order with the accumulators' own
pairwise (Chan) update, so the result equals one
:class:`~clustering.accumulate.CovarianceAccumulator` over all predictions to float64 rounding,
and never holds the split or its predictions::

    partial = holdout_statistics(run_dir, ctx.source(), settings=PassSettings(K, 512),
                                 half_of=half_of, actors=2)
    partial.covariance(), partial.confusions(), partial.copredictions(), partial.hard_counts()
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from clustering import CovarianceAccumulator, SparseCoPredictionAccumulator
from generalist.data.source import ExampleSource
from orchestration.artifacts import load_generalist
from orchestration.data_access import open_descriptor, source_descriptor
from orchestration.ray_data import quiet_ordered_data

SPLIT = "holdout"
MAX_BLOCK = 16_384      # examples per block at most: a block's statistics are a few K x K matrices
ARROW_LOGGER = "ray.data._internal.tensor_extensions.arrow"


@dataclass(frozen=True)
class PassSettings:
    """What the pass computes: K, the scoring batch size, and the sparse top-k (None: dense
    covariance plus the two halves' confusion and co-prediction)."""

    num_classes: int
    batch_size: int
    sparse_top_k: int | None = None

    @property
    def halves(self) -> bool:
        return self.sparse_top_k is None


@dataclass
class HoldoutPartial:
    """Statistics of some holdout examples; :meth:`merge` folds in those of other examples."""

    cov: CovarianceAccumulator | SparseCoPredictionAccumulator
    confusion: list[np.ndarray] = field(default_factory=list)         # per half: (K, K) soft confusion
    copred: list[CovarianceAccumulator] = field(default_factory=list)  # per half: its predictions
    codes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))   # (M,) label * K + argmax
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (M,) examples per code

    @classmethod
    def empty(cls, settings: PassSettings) -> HoldoutPartial:
        k = settings.num_classes
        if not settings.halves:
            return cls(SparseCoPredictionAccumulator(k, top_k=settings.sparse_top_k))
        return cls(CovarianceAccumulator(k), [np.zeros((k, k)) for _ in range(2)],
                   [CovarianceAccumulator(k) for _ in range(2)])

    @property
    def count(self) -> int:
        return self.cov.count

    def add(self, probs: np.ndarray, labels: np.ndarray, half: np.ndarray | None) -> None:
        """One batch: ``probs (B, K)`` float64 at T = 1, ``labels (B,)``, ``half (B,)`` 0 or 1."""
        k = self.cov.num_classes
        self.cov.update(probs)
        self._add_codes(labels * k + probs.argmax(axis=1))
        for h, copred in enumerate(self.copred):
            rows = half == h
            if rows.any():
                np.add.at(self.confusion[h], labels[rows], probs[rows])   # as ConfusionAccumulator
                copred.update(probs[rows])

    def merge(self, other: HoldoutPartial) -> None:
        self.cov.merge(other.cov)
        for mine, theirs in zip(self.copred, other.copred, strict=True):
            mine.merge(theirs)
        for h, confusion in enumerate(other.confusion):
            self.confusion[h] += confusion
        self._add_codes(other.codes, other.counts)

    def _add_codes(self, codes: np.ndarray, counts: np.ndarray | None = None) -> None:
        weights = np.ones(len(codes), np.int64) if counts is None else counts
        merged, inverse = np.unique(np.concatenate([self.codes, codes]), return_inverse=True)
        self.codes = merged
        self.counts = np.bincount(inverse, weights=np.concatenate([self.counts, weights]),
                                  minlength=len(merged)).astype(np.int64)

    def covariance(self) -> Any:
        """(K, K) covariance of the predictions, or the sparse top-k co-prediction matrix."""
        return self.cov.covariance() if self.cov_is_dense else self.cov.matrix()

    @property
    def cov_is_dense(self) -> bool:
        return isinstance(self.cov, CovarianceAccumulator)

    def confusions(self) -> list[np.ndarray]:
        """The soft confusion (K, K) of each half ([] for the sparse pass)."""
        for copred in self.copred:
            if copred.count == 0:
                raise ValueError("no holdout example fell in one of the two halves: the holdout "
                                 "split is too small; give it at least two examples")
        return [c.copy() for c in self.confusion]

    def copredictions(self) -> list[np.ndarray]:
        """E[p p^T] (K, K) of each half ([] for the sparse pass)."""
        return [p.covariance() + np.outer(p.mean(), p.mean()) for p in self.copred]

    def hard_counts(self) -> dict[str, np.ndarray]:
        """The holdout confusion counts, sparse: ``true``, ``predicted`` class ids and ``count``."""
        k = self.cov.num_classes
        return {"true": self.codes // k, "predicted": self.codes % k, "count": self.counts}


@torch.no_grad()
def block_statistics(model: torch.nn.Module, source: ExampleSource, start: int, stop: int,
                     half_of: np.ndarray | None, settings: PassSettings,
                     device: torch.device) -> HoldoutPartial:
    """The partial statistics of holdout positions ``start..stop-1``, scored in batches."""
    partial = HoldoutPartial.empty(settings)
    for begin in range(start, stop, settings.batch_size):
        positions = np.arange(begin, min(begin + settings.batch_size, stop))
        split = source.take(SPLIT, positions)
        x = split.images.to(device).float().div_(255.0)                     # (B, C, H, W)
        probs = torch.softmax(model(x).double(), dim=1).cpu().numpy()       # (B, K) at T = 1
        half = None if half_of is None else half_of[positions]
        partial.add(probs, split.labels.numpy(), half)
    return partial


def block_starts(n: int, settings: PassSettings, actors: int) -> tuple[int, list[int]]:
    """Block size (a multiple of the batch size, about 4 blocks per actor) and the starts."""
    per_actor = math.ceil(n / (4 * actors)) if n else 1
    block = max(1, math.ceil(per_actor / settings.batch_size)) * settings.batch_size
    block = max(settings.batch_size, min(block, MAX_BLOCK))
    return block, list(range(0, n, block))


def local_statistics(model: torch.nn.Module, source: ExampleSource, *, settings: PassSettings,
                     half_of: np.ndarray | None, device: torch.device,
                     on_block: Callable[[], None] | None = None) -> HoldoutPartial:
    """The same blocks scored in this process (what each actor does), merged in order."""
    total, n = HoldoutPartial.empty(settings), source.size(SPLIT)
    block, starts = block_starts(n, settings, actors=1)
    for start in starts:
        total.merge(block_statistics(model, source, start, min(start + block, n), half_of, settings, device))
        if on_block is not None:
            on_block()
    return total


class _ScoringActor:
    """A Ray Data actor: the run's generalist and the holdout source, scoring whole blocks."""

    def __init__(self, run_dir: str, descriptor: list[Any], half_of: list[Any], settings: PassSettings,
                 block: int, n: int):
        import ray

        # A block's statistics are Python objects Arrow has no type for: Ray Data stores them
        # pickled, as it should, after announcing that once per worker; say nothing instead.
        logging.getLogger(ARROW_LOGGER).setLevel(logging.ERROR)
        on_gpu = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
        if not on_gpu:
            torch.set_num_threads(1)
        self.device = torch.device("cuda" if on_gpu else "cpu")
        self.model = load_generalist(run_dir)[0].to(self.device)
        self.source = open_descriptor(ray.get(descriptor[0]))
        self.half_of = ray.get(half_of[0])      # (N,) uint8, or None for the sparse pass
        self.settings, self.block, self.n = settings, block, n

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One row per block start: the block's :class:`HoldoutPartial`."""
        parts = [block_statistics(self.model, self.source, int(s), min(int(s) + self.block, self.n),
                                  self.half_of, self.settings, self.device) for s in batch["start"]]
        return {"start": batch["start"], "partial": np.array(parts, dtype=object)}


def holdout_statistics(run_dir: str, source: ExampleSource, *, settings: PassSettings,
                       half_of: np.ndarray | None, actors: int, gpus_per_actor: float = 0.0,
                       on_block: Callable[[], None] | None = None) -> HoldoutPartial:
    """Score the holdout split of ``source`` with run ``run_dir``'s generalist on Ray Data.

    Args:
        run_dir: a run whose generalist stage finished (the actors load its checkpoint).
        source: the data; its holdout split is read by the actors, never by the driver.
        settings: K, batch size, sparse top-k.
        half_of: ``(N,)`` 0/1 half of every holdout example (None for the sparse pass).
        actors: size of the actor pool (at most one per block); gpus_per_actor: GPUs each.
        on_block: called in the driver after each merged block (progress).

    Uses the Ray already running in this process (the caller connects).
    """
    import ray
    import ray.data

    n = source.size(SPLIT)
    block, starts = block_starts(n, settings, actors)
    descriptor = ray.put(source_descriptor(source, (SPLIT,)))
    halves = ray.put(None if half_of is None else np.asarray(half_of, dtype=np.uint8))
    total = HoldoutPartial.empty(settings)
    with quiet_ordered_data():
        blocks = ray.data.from_numpy([np.array([s], dtype=np.int64) for s in starts])  # a Ray block each
        blocks = blocks.rename_columns({"data": "start"})
        parts = blocks.map_batches(
            _ScoringActor, batch_size=1, batch_format="numpy", num_cpus=1, num_gpus=gpus_per_actor or None,
            fn_constructor_kwargs={"run_dir": str(run_dir), "descriptor": [descriptor], "half_of": [halves],
                                   "settings": settings, "block": block, "n": n},
            compute=ray.data.ActorPoolStrategy(size=max(1, min(actors, len(starts)))),
        )
        for batch in _batches(parts):
            for partial in batch["partial"]:
                total.merge(partial)
                if on_block is not None:
                    on_block()
    return total


def _batches(parts: Any) -> Iterator[dict[str, np.ndarray]]:
    yield from parts.iter_batches(batch_size=None, batch_format="numpy")
