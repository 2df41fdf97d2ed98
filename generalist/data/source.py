"""`ExampleSource`: the one interface every stage reads examples through, in memory or streamed.

A source names its classes and image shape, knows its split sizes and per-class counts without
decoding anything, and yields uint8 batches in a deterministic order::

    source = InMemorySource(create_dataset("glyphs", seed=0))
    source.size("train"), source.class_counts("train")          # int, (K,) int64
    for images, labels in source.batches("train", batch_size=128, shuffle=True, seed=0, epoch=3):
        ...                                                       # (B, C, H, W) uint8, (B,) int64
    for images, labels, positions in source.indexed_batches("train", batch_size=128, shuffle=True):
        ...                                                       # the same batches + (B,) int64

Data-parallel reading: with ``world_size`` w > 1 ``batch_size`` is the *global* batch; every rank
yields the same number of batches, each of ``batch_size // w`` examples (the last, incomplete
global batch is dropped so no rank waits for another), and the ranks' examples are disjoint
within an epoch. With ``world_size`` 1 the order of :class:`InMemorySource` is exactly that of
:func:`generalist.train.iterate_batches`, so a single process sees the batches it always saw.
``indexed_batches`` yields the batches of ``batches`` with each example's position in its split
(what ``take`` and the soft-target cache are keyed by).

Small data (the built-in sets, a few thousand images) stays in memory behind
:class:`InMemorySource`; packed shards and folder trees stream behind the same methods.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from generalist.data.core import SPLIT_NAMES, DataBundle, DataError, Split


@runtime_checkable
class ExampleSource(Protocol):
    """Examples of one data set, by split (``train``, ``holdout``, ``test``)."""

    name: str
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]       # (C, H, W)
    info: dict

    @property
    def num_classes(self) -> int: ...

    def size(self, split: str) -> int: ...

    def class_counts(self, split: str) -> np.ndarray: ...          # (K,) int64

    def class_positions(self, split: str, classes: Sequence[int]) -> np.ndarray: ...  # (M,) int64

    def take(self, split: str, positions: Sequence[int] | np.ndarray) -> Split: ...

    def batches(self, split: str, *, batch_size: int, shuffle: bool, seed: int = 0, epoch: int = 0,
                rank: int = 0, world_size: int = 1) -> Iterator[tuple[Tensor, Tensor]]: ...

    def indexed_batches(self, split: str, *, batch_size: int, shuffle: bool, seed: int = 0,
                        epoch: int = 0, rank: int = 0,
                        world_size: int = 1) -> Iterator[tuple[Tensor, Tensor, Tensor]]: ...

    def describe(self) -> dict: ...


def check_split(split: str) -> str:
    if split not in SPLIT_NAMES:
        raise DataError(f"unknown split {split!r}; use one of {SPLIT_NAMES}")
    return split


def check_parallel(batch_size: int, rank: int, world_size: int) -> int:
    """The per-rank batch size; DataError when the global batch does not split evenly."""
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
    if batch_size % world_size:
        raise DataError(
            f"the global batch of {batch_size} does not split evenly over {world_size} workers; "
            f"choose a batch size divisible by {world_size}"
        )
    return batch_size // world_size


def epoch_order(n: int, *, shuffle: bool, seed: int, epoch: int) -> Tensor:
    """The positions 0..n-1 in the order an epoch visits them (same as iterate_batches)."""
    from generalist.train import _epoch_seed

    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(_epoch_seed(seed, epoch)))


def rank_batches(order: Tensor, batch_size: int, rank: int, world_size: int) -> Iterator[Tensor]:
    """Positions of each batch of ``rank``: the whole order in batches for one rank; for w > 1
    rank r's part of every complete global batch (its ``batch_size // w`` slice)."""
    per_rank = check_parallel(batch_size, rank, world_size)
    n = int(order.shape[0])
    if world_size == 1:
        for start in range(0, n, batch_size):
            yield order[start:start + batch_size]
        return
    for start in range(0, n - n % batch_size, batch_size):
        begin = start + rank * per_rank
        yield order[begin:begin + per_rank]


class InMemorySource:
    """An :class:`ExampleSource` over a :class:`DataBundle` held in memory."""

    def __init__(self, bundle: DataBundle) -> None:
        self.bundle = bundle
        self.name = bundle.name
        self.class_names = bundle.class_names
        self.image_shape = bundle.image_shape
        self.info = bundle.info

    @property
    def num_classes(self) -> int:
        return self.bundle.num_classes

    def split(self, split: str) -> Split:
        return getattr(self.bundle, check_split(split))

    def size(self, split: str) -> int:
        return len(self.split(split))

    def class_counts(self, split: str) -> np.ndarray:
        labels = self.split(split).labels.numpy()
        return np.bincount(labels, minlength=self.num_classes).astype(np.int64)  # (K,)

    def class_positions(self, split: str, classes: Sequence[int]) -> np.ndarray:
        labels = self.split(split).labels.numpy()
        return np.flatnonzero(np.isin(labels, np.asarray(classes, dtype=np.int64))).astype(np.int64)

    def take(self, split: str, positions: Sequence[int] | np.ndarray) -> Split:
        return self.split(split).subset(positions)

    def batches(self, split: str, *, batch_size: int, shuffle: bool, seed: int = 0, epoch: int = 0,
                rank: int = 0, world_size: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
        for images, labels, _ in self.indexed_batches(split, batch_size=batch_size, shuffle=shuffle,
                                                      seed=seed, epoch=epoch, rank=rank,
                                                      world_size=world_size):
            yield images, labels

    def indexed_batches(self, split: str, *, batch_size: int, shuffle: bool, seed: int = 0,
                        epoch: int = 0, rank: int = 0,
                        world_size: int = 1) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """The batches of :meth:`batches` and their positions: the epoch order's slices."""
        data = self.split(split)
        order = epoch_order(len(data), shuffle=shuffle, seed=seed, epoch=epoch)
        for index in rank_batches(order, batch_size, rank, world_size):
            yield data.images[index], data.labels[index], index                  # ..., (B,) int64

    def describe(self) -> dict[str, Any]:
        return self.bundle.describe()
