"""Input pipeline throughput for ``benchmarks.scale``: decoded + augmented images per second on one core.

A small packed set of smooth random images (grey 32 px, affine jitter; colour 224 px, crops and
flips) is read through the training loader exactly as a stage reads it (``PackedSource`` ->
``loader``: shard checksum, Parquet row groups, PNG decode, uint8 -> float, augmentation), in
one process with one torch thread, after one warm-up epoch. The figure sizes data workers per
accelerator: a GPU step of ``S`` images per second needs about ``S / figure`` loader workers.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from generalist.data import DataBundle, Split
from generalist.data.augment import AugmentSpec
from generalist.data.loader import loader
from generalist.data.packed import PackedSource
from generalist.data.packed_write import pack_source
from generalist.data.source import InMemorySource


def smooth_images(n: int, channels: int, size: int, seed: int) -> torch.Tensor:
    """(n, channels, size, size) uint8 images: bicubic upsampling of 8 x 8 noise (photo-like
    smoothness, so PNG sizes are realistic rather than those of white noise)."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.randn(n, channels, 8, 8, generator=gen)
    high = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return (128 + 40 * high).clamp(0, 255).to(torch.uint8)


def packed_set(root: Path, n: int, channels: int, size: int) -> PackedSource:
    images, labels = smooth_images(n, channels, size, seed=size), torch.arange(n) % 10
    split = Split(images, labels)
    bundle = DataBundle(f"smooth-{size}", tuple(f"c{i}" for i in range(10)), split,
                        split.subset(range(10)), split.subset(range(10)))
    pack_source(InMemorySource(bundle), str(root), origin={"src": "synthetic", "options": {},
                "seed": 0, "rule": "synthetic"}, shard_size=256, row_group_size=64,
                progress=lambda line: None)
    return PackedSource(str(root))


def images_per_second(source: PackedSource, augment: AugmentSpec, epochs: int) -> float:
    """Decoded + augmented training images per second, one process, one torch thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        def one_epoch(epoch: int) -> int:
            return sum(int(x.shape[0]) for x, _ in loader(source, "train", batch_size=64, shuffle=True,
                                                           seed=0, epoch=epoch, augment=augment))
        one_epoch(0)                                     # warm-up: imports, page cache
        start, seen = time.perf_counter(), 0
        for epoch in range(1, epochs + 1):
            seen += one_epoch(epoch)
        return seen / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)


def measure(quick: bool) -> dict[str, float]:
    """``{"img_per_s_per_core_32": ..., "img_per_s_per_core_224": ...}``."""
    cases = {32: (1, AugmentSpec(kind="affine"), 4096 if not quick else 2048),
             224: (3, AugmentSpec(kind="crop_flip", padding=16), 512 if not quick else 256)}
    out = {}
    with tempfile.TemporaryDirectory(prefix="specdistill-input-") as tmp:
        for size, (channels, augment, n) in cases.items():
            source = packed_set(Path(tmp) / str(size), n, channels, size)
            out[f"img_per_s_per_core_{size}"] = images_per_second(source, augment, epochs=2)
    return out


if __name__ == "__main__":
    print(measure(quick=True))
