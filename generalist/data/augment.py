"""On-the-fly training augmentation: one spec per data set, applied to whole batches, seeded.

Two families, chosen by the kind of images:

- ``affine`` (glyphs, handwriting, grey-scale sets): a random rotation, isotropic scale and
  shift per image (bilinear resampling, border pixels extend the background);
- ``crop_flip`` (natural images): a random crop of the image padded by ``padding`` pixels on each
  side (reflection), and a horizontal flip with probability 1/2;
- ``none``: the batch unchanged (evaluation never augments).

Every draw comes from a ``torch.Generator`` the caller seeds (e.g. from ``(seed, epoch)``), so a
resumed epoch sees the same augmented batches.

    spec = AugmentSpec(kind="affine", rotate=10.0, scale=0.1, shift=0.1)
    x = augment_batch(x, spec, generator)        # (B, C, H, W) float in [0, 1] -> same shape
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from generalist.data.splits import derive_seed

__all__ = ["AUGMENT_KINDS", "AugmentSpec", "augment_batch", "augmented_batches", "default_augment"]

AUGMENT_KINDS = ("none", "affine", "crop_flip")


@dataclass(frozen=True)
class AugmentSpec:
    """How training batches are augmented.

    Attributes:
        kind: ``"none"``, ``"affine"`` or ``"crop_flip"``.
        rotate: largest rotation in degrees (affine).
        scale: largest relative scale change, e.g. 0.1 = 90 % .. 110 % (affine).
        shift: largest shift as a fraction of the image side (affine).
        padding: pixels of reflection padding before the random crop (crop_flip).
        flip: horizontal flips with probability 1/2 (crop_flip).
    """

    kind: str = "none"
    rotate: float = 10.0
    scale: float = 0.1
    shift: float = 0.1
    padding: int = 4
    flip: bool = True

    def __post_init__(self) -> None:
        if self.kind not in AUGMENT_KINDS:
            raise ValueError(f"augmentation kind {self.kind!r} is unknown; use one of {AUGMENT_KINDS}")
        for name in ("rotate", "scale", "shift"):
            if not (isinstance(getattr(self, name), int | float) and getattr(self, name) >= 0):
                raise ValueError(f"augmentation {name} must be a number >= 0, got {getattr(self, name)!r}")
        if self.scale >= 1:
            raise ValueError(f"augmentation scale must be < 1 (a relative change), got {self.scale}")
        if isinstance(self.padding, bool) or not isinstance(self.padding, int) or self.padding < 0:
            raise ValueError(f"augmentation padding must be an int >= 0, got {self.padding!r}")

    @property
    def active(self) -> bool:
        return self.kind != "none"


def default_augment(channels: int) -> AugmentSpec:
    """The spec a data set gets when it declares none: affine jitter for grey-scale images
    (characters, handwriting), crops and flips for colour images (photos)."""
    return AugmentSpec(kind="affine") if channels == 1 else AugmentSpec(kind="crop_flip")


def _uniform(n: int, bound: float, generator: torch.Generator) -> Tensor:
    return (torch.rand(n, generator=generator) * 2 - 1) * bound  # (n,) in [-bound, bound]


def _affine(x: Tensor, spec: AugmentSpec, generator: torch.Generator) -> Tensor:
    b = x.shape[0]
    angle = _uniform(b, spec.rotate * math.pi / 180, generator)
    zoom = 1 + _uniform(b, spec.scale, generator)
    tx, ty = _uniform(b, 2 * spec.shift, generator), _uniform(b, 2 * spec.shift, generator)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _crop_flip(x: Tensor, spec: AugmentSpec, generator: torch.Generator) -> Tensor:
    b, _, h, w = x.shape
    p = spec.padding
    out = x
    if p > 0:
        padded = F.pad(x, (p, p, p, p), mode="reflect")  # (B, C, H + 2p, W + 2p)
        dy = torch.randint(0, 2 * p + 1, (b,), generator=generator).tolist()
        dx = torch.randint(0, 2 * p + 1, (b,), generator=generator).tolist()
        out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
    if spec.flip:
        flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    return out


def augment_batch(x: Tensor, spec: AugmentSpec, generator: torch.Generator) -> Tensor:
    """``x (B, C, H, W)`` float in [0, 1] augmented per image as ``spec`` says (same shape)."""
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"augment_batch needs a float (B, C, H, W) batch, got {x.dtype} {tuple(x.shape)}")
    if spec.kind == "affine":
        return _affine(x, spec, generator)
    if spec.kind == "crop_flip":
        return _crop_flip(x, spec, generator)
    return x


def augmented_batches(batches: Iterable[tuple[Tensor, Any]], spec: AugmentSpec | None, *, seed: int,
                      epoch: int) -> Iterator[tuple[Tensor, Any]]:
    """``(x, y)`` batches with ``x`` augmented; the draws depend only on ``(seed, epoch)`` and the
    batch order, so a resumed epoch repeats them. ``spec`` None or ``"none"`` passes through."""
    if spec is None or not spec.active:
        yield from batches
        return
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch, 0xA06))
    for x, y in batches:
        yield augment_batch(x, spec, generator), y
