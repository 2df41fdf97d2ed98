"""Training and evaluation batches from an :class:`~generalist.data.source.ExampleSource`.

    for x, y in loader(source, "train", batch_size=128, shuffle=True, seed=0, epoch=3,
                       augment=spec, device="cuda", workers=4):
        ...                            # x (B, C, H, W) float32 in [0, 1], y (B,) int64, on device

With ``workers=0`` (the default) batches are read, decoded and augmented in this process: the
uint8 batches move to ``device`` before conversion to float (4x smaller transfers) and
augmentation (:mod:`generalist.data.augment`) draws from one generator seeded by
``(seed, epoch)``, batch after batch, so a resumed epoch repeats it.

With ``workers=n > 0`` decoding and augmentation run in ``n`` torch DataLoader worker processes:
every worker walks the source's batch order and handles batch ``b`` when ``b % n`` is its id, so
the batches arrive in the same order as with one process. Sources that stream
(``PackedSource``, ``FolderSource``) hand the workers encoded batches and the workers decode
them; other sources hand them decoded uint8 batches. Each batch's augmentation then draws from
its own generator seeded by ``(seed, epoch, batch index)``: the numbers are deterministic and the
same for any worker count, but differ from ``workers=0``'s. With ``rank`` / ``world_size`` each
data-parallel worker gets its own part of every global batch (see :mod:`generalist.data.source`)
and, with more than one rank, augmentation draws of its own (:func:`augment_seed`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from generalist.data.augment import AugmentSpec, augment_batch, augmented_batches
from generalist.data.source import ExampleSource
from generalist.data.splits import derive_seed

BATCH_AUGMENT_STREAM = 0xA07
RANK_AUGMENT_STREAM = 0xA08


def _to_float(batches, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    non_blocking = device.type == "cuda"
    for images, labels in batches:
        x = images.to(device, non_blocking=non_blocking).float().div_(255.0)  # (B, C, H, W)
        yield x, labels.to(device, non_blocking=non_blocking).long()          # (B,)


def loader(source: ExampleSource, split: str, *, batch_size: int, shuffle: bool, seed: int = 0,
           epoch: int = 0, rank: int = 0, world_size: int = 1, augment: AugmentSpec | None = None,
           device: str | torch.device = "cpu", workers: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """Float batches of ``split`` on ``device``, augmented when ``augment`` is active."""
    read = {"batch_size": batch_size, "shuffle": shuffle, "seed": seed, "epoch": epoch, "rank": rank,
            "world_size": world_size}
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0 = in this process), got {workers}")
    if workers == 0:
        raw = source.batches(split, **read)
        return augmented_batches(_to_float(raw, torch.device(device)), augment,
                                 seed=augment_seed(seed, rank, world_size), epoch=epoch)
    stream = WorkerBatches(source, split, read, augment, workers)
    batches = DataLoader(stream, batch_size=None, num_workers=workers, worker_init_fn=_one_thread)
    return _to_device(batches, torch.device(device))


class WorkerBatches(IterableDataset):
    """The batches of one epoch, each decoded and augmented by worker ``b % workers``."""

    def __init__(self, source: ExampleSource, split: str, read: dict[str, Any],
                 augment: AugmentSpec | None, workers: int) -> None:
        self.source, self.split, self.read, self.augment, self.workers = source, split, read, augment, workers

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        encoded = hasattr(self.source, "encoded_batches")
        batches = (self.source.encoded_batches(self.split, **self.read) if encoded
                   else self.source.batches(self.split, **self.read))
        for index, batch in enumerate(batches):
            if index % self.workers != worker:
                continue
            images, labels = self.source.decode_batch(batch) if encoded else batch
            yield self._augmented(images.float().div_(255.0), index), labels   # (B, C, H, W), (B,)

    def _augmented(self, x: Tensor, index: int) -> Tensor:
        if self.augment is None or not self.augment.active:
            return x
        seed = augment_seed(self.read["seed"], self.read["rank"], self.read["world_size"])
        epoch = self.read["epoch"]
        generator = torch.Generator().manual_seed(derive_seed(seed, epoch, index, BATCH_AUGMENT_STREAM))
        return augment_batch(x, self.augment, generator)


def augment_seed(seed: int, rank: int, world_size: int) -> int:
    """The augmentation seed of one data-parallel rank: ``seed`` itself for one rank, else one of
    its own per rank, so the ranks' parts of a global batch get independent draws rather than
    the same sequence of transforms."""
    return seed if world_size == 1 else derive_seed(seed, rank, world_size, RANK_AUGMENT_STREAM)


def _one_thread(worker_id: int) -> None:
    torch.set_num_threads(1)


def _to_device(batches, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    non_blocking = device.type == "cuda"
    for x, y in batches:
        yield x.to(device, non_blocking=non_blocking), y.to(device, non_blocking=non_blocking).long()
