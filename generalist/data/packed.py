"""`PackedSource`: an :class:`~generalist.data.source.ExampleSource` streaming a packed data set.

    source = PackedSource("s3://bucket/cifar100-packed")     # or a local folder, file://...
    source.class_counts("train")                              # from the manifest, (K,) int64
    source.class_positions("train", [3, 7])                   # from the class index, no shard read
    source.take("train", [5, 900])                            # reads only the row groups holding them
    for images, labels in source.batches("train", batch_size=256, shuffle=True, seed=0, epoch=2,
                                         rank=1, world_size=4):
        ...                                                   # (64, C, H, W) uint8, (64,) int64

The format is :mod:`generalist.data.packed_format`; how the shards are split among data-parallel
ranks and shuffled is :mod:`generalist.data.stream`. A shard read for ``batches`` is read whole
and checked against its sha256 in the manifest before it is used; at most one shard, the
shuffle buffer (``buffer_size`` records, encoded) and one batch are held at a time. Images are
decoded batch by batch (:meth:`PackedSource.decode_batch`, in loader worker processes when
``loader(..., workers=n)``). ``create_dataset("packed", root=...)`` loads a small packed set
into memory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch import Tensor

from generalist.data.core import SPLIT_NAMES, DataBundle, DataError, Split
from generalist.data.images import ImageModeError, ImageSizeError, decode_image
from generalist.data.packed_format import ClassIndex, pack_command, read_manifest
from generalist.data.registry import register_dataset
from generalist.data.source import check_parallel, check_split
from generalist.data.storage import Storage
from generalist.data.stream import (
    Piece,
    Records,
    batches_per_rank,
    buffer_rng,
    rank_pieces,
    rebatch,
    shard_order,
    shuffle_buffer,
)

EncodedBatch = tuple[str, Records]          # (split, records)
DECODE_ERRORS = (OSError, ImageSizeError, ImageModeError, Image.DecompressionBombError)


class PackedSource:
    """The packed data set at ``root`` (a folder or a URI; see :mod:`generalist.data.storage`)."""

    def __init__(self, root: str, *, buffer_size: int = 2048) -> None:
        self.storage = Storage.open(root)
        self.manifest = read_manifest(self.storage)
        self.name = str(self.manifest["name"])
        self.class_names = tuple(self.manifest["class_names"])
        self.image_shape = tuple(int(v) for v in self.manifest["image_shape"])  # (C, H, W)
        self.info = dict(self.manifest.get("info", {}))
        self.buffer_size = buffer_size
        self.row_group_size = int(self.manifest["row_group_size"])
        self._indexes: dict[str, ClassIndex] = {}

    def __getstate__(self) -> dict:
        """Pickled (e.g. to Ray workers) without the loaded class indexes: each process maps its own."""
        return {**self.__dict__, "_indexes": {}}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _split(self, split: str) -> dict:
        return self.manifest["splits"][check_split(split)]

    def _shards(self, split: str) -> list[dict]:
        return self._split(split)["shards"]

    def size(self, split: str) -> int:
        return int(self._split(split)["size"])

    def class_counts(self, split: str) -> np.ndarray:
        return np.asarray(self._split(split)["class_counts"], dtype=np.int64)   # (K,)

    def class_positions(self, split: str, classes: Sequence[int]) -> np.ndarray:
        if split not in self._indexes:
            self._indexes[split] = ClassIndex.load(self.storage, check_split(split), self.manifest)
        return self._indexes[split].positions(np.asarray(classes, dtype=np.int64))

    def take(self, split: str, positions: Sequence[int] | np.ndarray) -> Split:
        """The records at ``positions``, in that order; reads only the row groups holding them."""
        wanted = np.asarray(positions, dtype=np.int64).reshape(-1)              # (M,)
        n = self.size(split)
        if wanted.size and (wanted.min() < 0 or wanted.max() >= n):
            raise DataError(f"positions must lie in [0, {n}) for the {split} split of {self.name!r}")
        starts = self._shard_starts(split)                                      # (S + 1,)
        shard_of = np.searchsorted(starts, wanted, side="right") - 1             # (M,)
        images = np.empty((wanted.size, *self.image_shape), dtype=np.uint8)     # (M, C, H, W)
        labels = np.empty(wanted.size, dtype=np.int64)                          # (M,)
        for shard in np.unique(shard_of):
            chosen = np.flatnonzero(shard_of == shard)
            records = self._rows(split, int(shard), wanted[chosen] - starts[shard])
            images[chosen] = self.decode_batch((split, records))[0].numpy()
            labels[chosen] = records.labels
        return Split(torch.from_numpy(images), torch.from_numpy(labels))

    def _rows(self, split: str, shard: int, rows: np.ndarray) -> Records:
        """Records at ``rows`` of one shard, reading only their row groups (ranged reads)."""
        size = self.row_group_size
        groups = np.unique(rows // size)
        name = self._shards(split)[shard]["file"]
        try:
            with self.storage.open_input(name) as handle:
                table = pq.ParquetFile(handle).read_row_groups(groups.tolist(), columns=["label", "image"])
        except (pa.ArrowException, OSError) as err:
            raise self._damaged(name, f"its row group(s) {groups.tolist()} cannot be read ({err})") from None
        local = np.searchsorted(groups, rows // size) * size + rows % size      # rows of `table`
        return _records(table.take(pa.array(local)), shard, rows)

    def batches(self, split: str, *, batch_size: int, shuffle: bool, seed: int = 0, epoch: int = 0,
                rank: int = 0, world_size: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
        for batch in self.encoded_batches(split, batch_size=batch_size, shuffle=shuffle, seed=seed,
                                          epoch=epoch, rank=rank, world_size=world_size):
            yield self.decode_batch(batch)

    def indexed_batches(self, split: str, *, batch_size: int, shuffle: bool, seed: int = 0,
                        epoch: int = 0, rank: int = 0,
                        world_size: int = 1) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """The batches of :meth:`batches` and their positions in the split, (B,) int64: record
        ``(shard, row)`` sits at the shard's first position + ``row``."""
        starts = self._shard_starts(split)                                      # (S + 1,)
        for batch in self.encoded_batches(split, batch_size=batch_size, shuffle=shuffle, seed=seed,
                                          epoch=epoch, rank=rank, world_size=world_size):
            origin = batch[1].origin                                            # (B, 2)
            yield *self.decode_batch(batch), torch.from_numpy(starts[origin[:, 0]] + origin[:, 1])

    def _shard_starts(self, split: str) -> np.ndarray:
        """The position of each shard's first record, then the split's size: (S + 1,) int64."""
        return np.cumsum([0] + [int(s["records"]) for s in self._shards(split)]).astype(np.int64)

    def encoded_batches(self, split: str, *, batch_size: int, shuffle: bool, seed: int = 0,
                        epoch: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[EncodedBatch]:
        """The batches of :meth:`batches`, not yet decoded (rules: :mod:`generalist.data.stream`)."""
        per_rank = check_parallel(batch_size, rank, world_size)
        sizes = [int(s["records"]) for s in self._shards(split)]
        order = shard_order(len(sizes), shuffle=shuffle, seed=seed, epoch=epoch)
        limit = batches_per_rank(sizes, order, batch_size, world_size)
        chunks = (chunk for piece in rank_pieces(sizes, order, rank, world_size)
                  for chunk in self._piece(split, piece))
        if shuffle:
            chunks = shuffle_buffer(chunks, self.buffer_size, buffer_rng(seed, epoch, rank))
        for records in rebatch(chunks, per_rank, limit):
            yield split, records

    def _piece(self, split: str, piece: Piece) -> Iterator[Records]:
        """Rows ``piece.start:piece.stop`` of a shard, row group by row group, the shard checked."""
        name = self._shards(split)[piece.shard]["file"]
        parquet = self._open_checked(split, piece.shard)
        size = self.row_group_size
        for group in range(piece.start // size, -(-piece.stop // size)):
            try:
                table = parquet.read_row_group(group, columns=["label", "image"])
            except (pa.ArrowException, OSError) as err:
                raise self._damaged(name, f"its row group {group} cannot be read ({err})") from None
            low, high = max(piece.start, group * size), min(piece.stop, (group + 1) * size)
            yield _records(table.slice(low - group * size, high - low), piece.shard, np.arange(low, high))

    def _open_checked(self, split: str, shard: int) -> pq.ParquetFile:
        entry = self._shards(split)[shard]
        data = self.storage.read_bytes(entry["file"])
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"]:
            raise self._damaged(entry["file"], f"it does not match its checksum in the manifest (sha256 "
                                f"{digest[:12]}..., expected {entry['sha256'][:12]}...): it was damaged "
                                "or changed")
        try:
            return pq.ParquetFile(pa.BufferReader(data))
        except (pa.ArrowException, OSError) as err:
            raise self._damaged(entry["file"], f"it is not a readable Parquet file ({err})") from None

    def decode_batch(self, batch: EncodedBatch) -> tuple[Tensor, Tensor]:
        """An encoded batch -> (B, C, H, W) uint8 images and (B,) int64 labels."""
        split, records = batch
        images = np.empty((len(records), *self.image_shape), dtype=np.uint8)    # (B, C, H, W)
        for i, payload in enumerate(records.payloads):
            shard, row = (int(v) for v in records.origin[i])
            try:
                images[i] = decode_image(payload, self.image_shape)
            except DECODE_ERRORS as err:
                name = self._shards(split)[shard]["file"]
                raise self._damaged(name, f"its record {row} (row group {row // self.row_group_size}) "
                                    f"does not decode as a {self.image_shape} image ({err})") from None
        return torch.from_numpy(images), torch.from_numpy(np.asarray(records.labels, dtype=np.int64))

    def _damaged(self, name: str, problem: str) -> DataError:
        return DataError(f"packed shard {self.storage.where(name)} is damaged: {problem}; re-run "
                         f"`{pack_command(self.manifest, self.storage.root)}` to rewrite it")

    def describe(self) -> dict[str, Any]:
        """Sizes and checksums (of the shards' sha256 in order) per split, like DataBundle.describe."""
        names = hashlib.sha256("\n".join(self.class_names).encode("utf-8")).hexdigest()
        splits = {split: {"size": self.size(split), "sha256": hashlib.sha256(
            "\n".join(s["sha256"] for s in self._shards(split)).encode()).hexdigest()}
            for split in SPLIT_NAMES}
        return {"name": self.name, "num_classes": self.num_classes, "image_shape": list(self.image_shape),
                "class_names_sha256": names, "format": "packed", "splits": splits}


def _records(table: pa.Table, shard: int, rows: np.ndarray) -> Records:
    payloads = np.empty(table.num_rows, dtype=object)                           # (n,) bytes
    payloads[:] = table.column("image").to_pylist()
    labels = table.column("label").to_numpy().astype(np.int64)                 # (n,)
    origin = np.stack([np.full(rows.shape[0], shard), rows], axis=1).astype(np.int64)  # (n, 2)
    return Records(payloads, labels, origin)


def require_root(root: str | None) -> str:
    """``root``, or the DataError saying that packed data needs one."""
    if root is None:
        raise DataError("data set 'packed' needs root=<folder or URI> written by `specdistill data pack "
                        "SRC OUT`; pass data.root=OUT")
    return str(root)


@register_dataset("packed")
def build_packed(*, root: str | None = None, seed: int = 0) -> DataBundle:
    """A packed data set (``specdistill data pack``) loaded into memory, for small sets. ``seed``
    is not used: the splits were fixed when the data was packed (manifest ``split``)."""
    source = PackedSource(require_root(root))
    splits = {split: source.take(split, np.arange(source.size(split))) for split in SPLIT_NAMES}
    info = {**source.info, "packed_root": str(root), "split": source.manifest.get("split", {})}
    return DataBundle(source.name, source.class_names, splits["train"], splits["holdout"], splits["test"], info)
