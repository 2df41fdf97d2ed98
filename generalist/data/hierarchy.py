"""`hierarchy`: synthetic images with planted super-classes, for testing clustering.

Each super-class has a random smooth prototype; each class adds a small class-specific
smooth pattern (scaled by `within_separation`); each sample is its class pattern shifted
by up to 1 px, plus white Gaussian noise. Classes of different super-classes are far
apart, classes of one super-class close, so a classifier's mistakes fall inside the true
super-class. `info["superclass_of"][k]` is class k's super-class::

    images  # (N, 1, image_size, image_size) uint8, 128 + 16 * (pattern + noise)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from generalist.data.core import DataBundle, Split
from generalist.data.registry import check_float, check_int, register_dataset
from generalist.data.splits import SPLIT_STREAM, generator

PROTOTYPE_GRID = 4  # super-class prototypes vary on a 4 x 4 grid (smooth)
DETAIL_GRID = 6  # class patterns vary on a slightly finer 6 x 6 grid
GAIN = 16.0  # uint8 value = 128 + GAIN * intensity (total std ~1.8 -> clipped beyond 4.4 std)
PATTERN_STREAM = 7  # generator stream for prototypes / class patterns


def smooth_fields(count: int, size: int, grid: int, gen: torch.Generator) -> torch.Tensor:
    """`count` random smooth fields (bicubic upsampling of grid x grid normal noise).

    Returns (count, size, size) float32, each with zero mean and unit std.
    """
    coarse = torch.randn(count, 1, grid, grid, generator=gen)
    fields = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)
    fields = fields.squeeze(1)
    fields = fields - fields.mean(dim=(1, 2), keepdim=True)
    return fields / fields.std(dim=(1, 2), keepdim=True)


def class_patterns(num_super: int, per_super: int, size: int, separation: float,
                   seed: int) -> torch.Tensor:
    """Prototype + separation * detail per class: (num_super * per_super, size, size) float32.

    Classes are numbered super-class by super-class (class k is in super-class k // per_super).
    """
    gen = generator(seed, PATTERN_STREAM)
    prototypes = smooth_fields(num_super, size, PROTOTYPE_GRID, gen)
    details = smooth_fields(num_super * per_super, size, DETAIL_GRID, gen)
    return prototypes.repeat_interleave(per_super, dim=0) + separation * details


def sample_split(patterns: torch.Tensor, per_class: int, size: int, noise: float,
                 gen: torch.Generator) -> Split:
    """`per_class` samples per class from patterns (K, size + 2, size + 2), shuffled order.

    Each sample is a random size x size crop (shift of up to 1 px each way) + noise.
    """
    num_classes = patterns.shape[0]
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    count = len(labels)
    dy, dx = torch.randint(0, 3, (2, count), generator=gen)
    steps = torch.arange(size)
    rows = (dy[:, None] + steps)[:, :, None]  # (N, size, 1)
    cols = (dx[:, None] + steps)[:, None, :]  # (N, 1, size)
    crops = patterns[labels[:, None, None], rows, cols]  # (N, size, size)
    images = crops + noise * torch.randn(count, size, size, generator=gen)
    pixels = (128.0 + GAIN * images).round_().clamp_(0, 255).to(torch.uint8).unsqueeze(1)
    order = torch.randperm(count, generator=gen)
    return Split(pixels[order].contiguous(), labels[order].contiguous())


@register_dataset("hierarchy")
def build_hierarchy(*, root: str | None = None, seed: int = 0, num_superclasses: int = 8,
                    classes_per_superclass: int = 5, train_per_class: int = 100,
                    holdout_per_class: int = 20, test_per_class: int = 20,
                    image_size: int = 16, within_separation: float = 0.25,
                    noise: float = 1.5) -> DataBundle:
    """Planted two-level hierarchy, 1 x image_size x image_size; `root` is ignored.

    within_separation: size of the class-specific pattern relative to the super-class
    prototype (0 makes the classes of a super-class identical; ~2 makes the hierarchy
    hard to see). noise: std of the per-pixel white noise, same units (patterns have
    std ~1). The defaults give a small CNN clearly-above-chance, imperfect accuracy.
    """
    num_super = check_int("num_superclasses", num_superclasses, minimum=1)
    per_super = check_int("classes_per_superclass", classes_per_superclass, minimum=1)
    check_int("num_classes (num_superclasses * classes_per_superclass)", num_super * per_super,
              minimum=2)
    size = check_int("image_size", image_size, minimum=4, maximum=256)
    separation = check_float("within_separation", within_separation, minimum=0.0, maximum=100.0)
    noise = check_float("noise", noise, minimum=0.0, maximum=100.0)
    per_split = {
        "train": check_int("train_per_class", train_per_class, minimum=1),
        "holdout": check_int("holdout_per_class", holdout_per_class, minimum=0),
        "test": check_int("test_per_class", test_per_class, minimum=0),
    }
    patterns = class_patterns(num_super, per_super, size + 2, separation, seed)
    splits = {
        name: sample_split(patterns, n, size, noise, generator(seed, SPLIT_STREAM[name]))
        for name, n in per_split.items()
    }
    names = tuple(f"s{s}_c{c}" for s in range(num_super) for c in range(per_super))
    info = {
        "superclass_of": [k // per_super for k in range(len(names))],
        "num_superclasses": num_super,
        "classes_per_superclass": per_super,
        "within_separation": separation,
        "noise": noise,
        "per_class": per_split,
        "augment": "none",  # smooth random fields: spatial jitter would not keep the class
    }
    return DataBundle("hierarchy", names, splits["train"], splits["holdout"], splits["test"], info)

