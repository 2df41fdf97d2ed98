"""How a Ray task or actor reaches the stage's data: a small descriptor in, a source out.

The driver turns the stage's :class:`~generalist.data.source.ExampleSource` into a descriptor
(:func:`source_descriptor`); each task or actor re-opens it (:func:`open_descriptor`) and reads
only the examples it needs with ``class_positions`` + ``take`` or ``batches``::

    descriptor = source_descriptor(ctx.source(), ("train", "holdout"))   # driver
    source = open_descriptor(descriptor)                                  # in the task

In-memory data (the built-in sets) is small: its descriptor is the arrays of the splits the tasks
read, ``{"train_images": (N, C, H, W) uint8, "train_labels": (N,) int64, ...}``, which Ray puts in
the object store once and shares with every task. A streaming source is its own descriptor: it
pickles as where it reads from (a path and its index), so nothing data-set-sized goes through the
object store.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from generalist.data.core import SPLIT_NAMES, DataBundle, Split
from generalist.data.source import ExampleSource, InMemorySource

SourceDescriptor = Mapping[str, torch.Tensor] | ExampleSource


def source_descriptor(source: ExampleSource, splits: Sequence[str]) -> SourceDescriptor:
    """What a task needs to read ``splits`` of ``source`` (see the module docstring)."""
    if not isinstance(source, InMemorySource):
        return source
    arrays: dict[str, torch.Tensor] = {}
    for name in splits:
        split = source.split(name)
        arrays[f"{name}_images"], arrays[f"{name}_labels"] = split.images, split.labels
    return arrays


def open_descriptor(descriptor: SourceDescriptor) -> ExampleSource:
    """The source a descriptor of :func:`source_descriptor` stands for (in a task or actor).

    For in-memory arrays the splits not given are empty and the classes are named by their ids
    (``"0"``, ``"1"``, ...): the tasks read examples and labels, never class names.
    """
    if not isinstance(descriptor, Mapping):
        return descriptor
    present = [s for s in SPLIT_NAMES if f"{s}_labels" in descriptor]
    if not present:
        raise ValueError(f"a data descriptor needs the arrays of at least one split "
                         f"({', '.join(f'{s}_images/{s}_labels' for s in SPLIT_NAMES)}); got "
                         f"{sorted(descriptor)}")
    shape = tuple(descriptor[f"{present[0]}_images"].shape[1:])
    splits = {s: _split(descriptor, s, shape) for s in SPLIT_NAMES}
    top = max((int(split.labels.max()) for split in splits.values() if len(split)), default=1)
    names = tuple(str(c) for c in range(max(2, top + 1)))
    return InMemorySource(DataBundle("arrays", names, splits["train"], splits["holdout"], splits["test"]))


def _split(descriptor: Mapping[str, Any], name: str, shape: tuple[int, ...]) -> Split:
    if f"{name}_labels" not in descriptor:
        return Split(torch.empty((0, *shape), dtype=torch.uint8), torch.empty(0, dtype=torch.int64))
    return Split(descriptor[f"{name}_images"], descriptor[f"{name}_labels"])
