"""Streaming over shards: which rows each data-parallel rank reads, a shuffle buffer, batching.

The rule a sharded source follows (:class:`generalist.data.packed.PackedSource`):

1. Shard order: the shards of the split in storage order, or with ``shuffle`` a permutation
   seeded by ``(seed, epoch)``; the same on every rank.
2. Ranks: the shards in that order form one sequence of N records; rank r reads its contiguous
   part, records ``[N r // w, N (r + 1) // w)``: whole shards, and at most a part of one shard at
   each end, so every rank holds N // w or N // w + 1 records whatever the shard sizes.
3. Shuffle buffer (``shuffle`` only): records enter a buffer of ``buffer_size`` records; each
   arriving chunk of n records lets n records, drawn at random from the buffer, out (a generator
   seeded by ``(seed, epoch, rank)``); the rest leaves in a random order at the end.
4. Batches: ``batch_size`` examples with one rank, the last one possibly smaller. With ``w > 1``
   every rank yields exactly ``min_r(records of rank r) // (batch_size // w)`` batches of
   ``batch_size // w``: a rank stops there, so no rank waits for another, and the records past it
   (fewer than one batch per rank) are skipped this epoch and read in another.

Everything is decided by ``(seed, epoch, rank, world_size)``: a resumed epoch repeats itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from generalist.data.splits import derive_seed

SHARD_ORDER_STREAM = 0x5A4D
BUFFER_STREAM = 0xB0FF


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of shard ``shard`` (an index into the split's shard list)."""

    shard: int
    start: int
    stop: int

    @property
    def records(self) -> int:
        return self.stop - self.start


@dataclass
class Records:
    """A run of encoded records: payloads (object array of bytes or paths), labels and where each
    came from (shard, row), all of length n."""

    payloads: np.ndarray    # (n,) object
    labels: np.ndarray      # (n,) int64
    origin: np.ndarray      # (n, 2) int64: shard index, row in the shard

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def pick(self, index: np.ndarray) -> Records:
        return Records(self.payloads[index], self.labels[index], self.origin[index])

    @staticmethod
    def join(parts: list[Records]) -> Records:
        if not parts:
            return Records(np.empty(0, dtype=object), np.empty(0, np.int64), np.empty((0, 2), np.int64))
        return Records(np.concatenate([p.payloads for p in parts]), np.concatenate([p.labels for p in parts]),
                       np.concatenate([p.origin for p in parts]))


def shard_order(num_shards: int, *, shuffle: bool, seed: int, epoch: int) -> list[int]:
    """The order an epoch visits the shards in (rule 1)."""
    if not shuffle:
        return list(range(num_shards))
    rng = np.random.default_rng(derive_seed(seed, epoch, SHARD_ORDER_STREAM))
    return rng.permutation(num_shards).tolist()


def rank_pieces(shard_sizes: list[int], order: list[int], rank: int, world_size: int) -> list[Piece]:
    """The rows rank ``rank`` reads, in order (rule 2)."""
    total = sum(shard_sizes[s] for s in order)
    low, high = total * rank // world_size, total * (rank + 1) // world_size
    pieces, offset = [], 0
    for s in order:
        start, stop = max(low, offset), min(high, offset + shard_sizes[s])
        if stop > start:
            pieces.append(Piece(s, start - offset, stop - offset))
        offset += shard_sizes[s]
    return pieces


def batches_per_rank(shard_sizes: list[int], order: list[int], batch_size: int, world_size: int) -> int | None:
    """Rule 4's batch count for ``w > 1``; None for one rank (every record, last batch partial)."""
    if world_size == 1:
        return None
    fewest = min(sum(p.records for p in rank_pieces(shard_sizes, order, r, world_size))
                 for r in range(world_size))
    return fewest // (batch_size // world_size)


def shuffle_buffer(chunks: Iterable[Records], size: int, rng: np.random.Generator) -> Iterator[Records]:
    """Records of ``chunks`` in a random order, never holding more than ``size`` plus one chunk
    (rule 3)."""
    held = Records.join([])
    for chunk in chunks:
        held = Records.join([held, chunk])
        surplus = len(held) - size
        if surplus > 0:
            out = np.zeros(len(held), dtype=bool)
            out[rng.choice(len(held), size=surplus, replace=False)] = True
            yield held.pick(rng.permutation(np.flatnonzero(out)))
            held = held.pick(np.flatnonzero(~out))
    if len(held):
        yield held.pick(rng.permutation(len(held)))


def buffer_rng(seed: int, epoch: int, rank: int) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, epoch, rank, BUFFER_STREAM))


def rebatch(chunks: Iterable[Records], batch_size: int, limit: int | None) -> Iterator[Records]:
    """Batches of ``batch_size`` records from ``chunks``; at most ``limit`` of them and only full
    ones when ``limit`` is set, else every record (the last batch possibly smaller)."""
    if limit == 0:
        return
    pending: list[Records] = []
    count, done = 0, 0
    for chunk in chunks:
        pending.append(chunk)
        count += len(chunk)
        while count >= batch_size:
            held = Records.join(pending)
            yield held.pick(np.arange(batch_size))
            rest = held.pick(np.arange(batch_size, len(held)))
            pending, count, done = [rest], len(rest), done + 1
            if done == limit:
                return
    if limit is None and count:
        yield Records.join(pending)
