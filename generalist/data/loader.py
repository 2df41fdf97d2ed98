"""Training and evaluation batches from an :class:`~generalist.data.source.ExampleSource`.

    for x, y in loader(source, "train", batch_size=128, shuffle=True, seed=0, epoch=3,
                       augment=spec, device="cuda"):
        ...                            # x (B, C, H, W) float32 in [0, 1], y (B,) int64, on device

The uint8 batches move to ``device`` before conversion to float (4x smaller transfers);
augmentation (:mod:`generalist.data.augment`) is seeded by ``(seed, epoch)`` and the batch order,
so a resumed epoch repeats it. With ``rank`` / ``world_size`` each data-parallel worker gets its
own part of every global batch (see :mod:`generalist.data.source`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from generalist.data.augment import AugmentSpec, augmented_batches
from generalist.data.source import ExampleSource


def _to_float(batches, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    non_blocking = device.type == "cuda"
    for images, labels in batches:
        x = images.to(device, non_blocking=non_blocking).float().div_(255.0)  # (B, C, H, W)
        yield x, labels.to(device, non_blocking=non_blocking).long()          # (B,)


def loader(source: ExampleSource, split: str, *, batch_size: int, shuffle: bool, seed: int = 0,
           epoch: int = 0, rank: int = 0, world_size: int = 1, augment: AugmentSpec | None = None,
           device: str | torch.device = "cpu") -> Iterator[tuple[Tensor, Tensor]]:
    """Float batches of ``split`` on ``device``, augmented when ``augment`` is active."""
    raw = source.batches(split, batch_size=batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                         rank=rank, world_size=world_size)
    return augmented_batches(_to_float(raw, torch.device(device)), augment, seed=seed, epoch=epoch)
