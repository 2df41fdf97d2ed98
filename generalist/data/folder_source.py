"""`FolderSource`: a folder-per-class tree read directly, image by image, as an ExampleSource.

    source = FolderSource("photos/", seed=0, image_size=64, channels=3)
    source.class_counts("train")                 # from the file list, nothing decoded
    for images, labels in source.batches("train", batch_size=128, shuffle=True, epoch=1):
        ...                                      # (128, 3, 64, 64) uint8, decoded for this batch

Same layouts, options and split rule as the ``image_folder`` data set
(:func:`generalist.data.image_folder.build_image_folder`), worked out on the file list alone:
each split holds the same files in the same order as that data set's split, so with one worker
the batches equal those of ``InMemorySource(create_dataset("image_folder", ...))``. Only the
paths and labels are held (N of each); images are decoded per batch
(:meth:`FolderSource.decode_batch`, in loader worker processes with ``loader(..., workers=n)``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from generalist.data.core import SPLIT_NAMES, Split
from generalist.data.image_folder import holdout_source_mask, load_image, open_tree
from generalist.data.registry import check_float
from generalist.data.source import check_split, epoch_order, rank_batches
from generalist.data.splits import SPLIT_STREAM, derive_seed, generator, stratified_indices
from generalist.data.stream import Records

EncodedBatch = tuple[str, Records]          # (split, records: payloads are file paths)


@dataclass(frozen=True)
class FolderLayout:
    """Every image file of a tree, its label, and which files (in which order) form each split."""

    class_names: tuple[str, ...]
    paths: np.ndarray                  # (F,) object: Path
    labels: np.ndarray                 # (F,) int64
    splits: dict[str, np.ndarray]      # split -> (N_split,) int64 indices into paths
    info: dict


def folder_layout(root: str | None, *, seed: int, image_size: int, channels: int,
                  holdout_fraction: float, test_fraction: float, num_classes: int | None,
                  source_pattern: str | None) -> FolderLayout:
    """The splits of ``build_image_folder`` with the same arguments, as file indices."""
    base, size, train_files, test_files = open_tree(root, image_size, channels, num_classes)
    class_ids = {name: k for k, name in enumerate(train_files)}
    tables = [train_files] + ([test_files] if test_files is not None else [])
    paths = [p for files in tables for name, ps in files.items() for p in ps]
    labels = np.array([class_ids[name] for files in tables for name, ps in files.items() for _ in ps],
                      dtype=np.int64)
    n_train = sum(len(ps) for ps in train_files.values())
    train, holdout, info = np.arange(n_train), None, {}
    if source_pattern is not None:
        mask, held = holdout_source_mask(train_files, source_pattern, holdout_fraction, seed)
        train, holdout = train[~mask], train[mask]
        info = {"source_pattern": source_pattern, "holdout_sources": held}
    if test_files is None:
        fraction = check_float("test_fraction", test_fraction, minimum=0.0, maximum=1.0, max_inclusive=False)
        keep, carved = stratified_indices(labels[train], fraction, derive_seed(seed, SPLIT_STREAM["test"]))
        train, test = train[keep], train[carved]
    else:
        test = np.arange(n_train, len(paths))
    train = train[torch.randperm(len(train), generator=generator(seed, SPLIT_STREAM["train"], 0)).numpy()]
    fraction = check_float("holdout_fraction", holdout_fraction, minimum=0.0, maximum=1.0, max_inclusive=False)
    if holdout is None:
        keep, carved = stratified_indices(labels[train], fraction, derive_seed(seed, SPLIT_STREAM["holdout"]))
        train, holdout = train[keep], train[carved]
    info = {"root": str(base), "test_source": "test/" if test_files else "carved", "image_size": size,
            "channels": channels, **info, "holdout_fraction": fraction}
    files = np.empty(len(paths), dtype=object)
    files[:] = paths
    return FolderLayout(tuple(train_files), files, labels,
                        {"train": train, "holdout": holdout, "test": test}, info)


class FolderSource:
    """An image_folder tree as an ExampleSource (options: those of the ``image_folder`` data set)."""

    def __init__(self, root: str | None, *, seed: int = 0, image_size: int = 32, channels: int = 3,
                 holdout_fraction: float = 0.1, test_fraction: float = 0.1,
                 num_classes: int | None = None, source_pattern: str | None = None) -> None:
        self.options = {"seed": seed, "image_size": image_size, "channels": channels,
                        "holdout_fraction": holdout_fraction, "test_fraction": test_fraction,
                        "num_classes": num_classes, "source_pattern": source_pattern}
        self.root = root
        self.layout = folder_layout(root, **self.options)
        self.name = "image_folder"
        self.class_names = self.layout.class_names
        self.info = self.layout.info
        self.image_shape = (channels, self.info["image_size"], self.info["image_size"])

    def __reduce__(self) -> tuple:
        """Pickled as its root and options (not its N paths): a process it is sent to lists the
        tree again, which it must be able to read anyway."""
        return _reopen, (self.root, self.options)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _files(self, split: str) -> np.ndarray:
        return self.layout.splits[check_split(split)]                          # (N,) file indices

    def size(self, split: str) -> int:
        return len(self._files(split))

    def class_counts(self, split: str) -> np.ndarray:
        labels = self.layout.labels[self._files(split)]
        return np.bincount(labels, minlength=self.num_classes).astype(np.int64)  # (K,)

    def class_positions(self, split: str, classes: Sequence[int]) -> np.ndarray:
        labels = self.layout.labels[self._files(split)]
        return np.flatnonzero(np.isin(labels, np.asarray(classes, dtype=np.int64))).astype(np.int64)

    def take(self, split: str, positions: Sequence[int] | np.ndarray) -> Split:
        index = np.asarray(positions, dtype=np.int64).reshape(-1)
        images, labels = self.decode_batch((split, self._records(split, index)))
        return Split(images, labels)

    def _records(self, split: str, positions: np.ndarray) -> Records:
        files = self._files(split)[positions]
        origin = np.stack([np.zeros_like(files), files], axis=1)               # (n, 2)
        return Records(self.layout.paths[files], self.layout.labels[files], origin)

    def batches(self, split: str, *, batch_size: int, shuffle: bool, seed: int = 0, epoch: int = 0,
                rank: int = 0, world_size: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
        for batch in self.encoded_batches(split, batch_size=batch_size, shuffle=shuffle, seed=seed,
                                          epoch=epoch, rank=rank, world_size=world_size):
            yield self.decode_batch(batch)

    def indexed_batches(self, split: str, *, batch_size: int, shuffle: bool, seed: int = 0,
                        epoch: int = 0, rank: int = 0,
                        world_size: int = 1) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """The batches of :meth:`batches` and their positions in the split, (B,) int64."""
        order = epoch_order(self.size(split), shuffle=shuffle, seed=seed, epoch=epoch)
        for index in rank_batches(order, batch_size, rank, world_size):
            yield *self.decode_batch((split, self._records(split, index.numpy()))), index

    def encoded_batches(self, split: str, *, batch_size: int, shuffle: bool, seed: int = 0,
                        epoch: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[EncodedBatch]:
        """The batches of :meth:`batches` as file paths (InMemorySource's order and rank rule)."""
        order = epoch_order(self.size(split), shuffle=shuffle, seed=seed, epoch=epoch)
        for index in rank_batches(order, batch_size, rank, world_size):
            yield split, self._records(split, index.numpy())

    def decode_batch(self, batch: EncodedBatch) -> tuple[Tensor, Tensor]:
        """Paths -> (B, C, H, W) uint8 images (resized) and (B,) int64 labels."""
        _, records = batch
        channels, size, _ = self.image_shape
        images = np.empty((len(records), *self.image_shape), dtype=np.uint8)    # (B, C, H, W)
        for i, path in enumerate(records.payloads):
            images[i] = load_image(Path(path), size, channels)
        return torch.from_numpy(images), torch.from_numpy(np.asarray(records.labels, dtype=np.int64))

    def describe(self) -> dict[str, Any]:
        """Sizes and, per split, the sha256 of its files' paths (under the root) in order."""
        root = Path(self.info["root"])
        names = hashlib.sha256("\n".join(self.class_names).encode("utf-8")).hexdigest()
        splits = {}
        for split in SPLIT_NAMES:
            listing = "\n".join(Path(p).relative_to(root).as_posix() for p in self.layout.paths[self._files(split)])
            splits[split] = {"size": self.size(split), "sha256": hashlib.sha256(listing.encode()).hexdigest()}
        return {"name": self.name, "num_classes": self.num_classes, "image_shape": list(self.image_shape),
                "class_names_sha256": names, "format": "folder", "splits": splits}


def _reopen(root: str | None, options: dict[str, Any]) -> FolderSource:
    return FolderSource(root, **options)
