"""Turn cached base glyphs into random samples, vectorised over batches.

Per sample: a font, a random affine jitter (rotation, scale, aspect, shear, shift), a
random stroke width (a blend of the glyph with its 3 x 3 dilation or erosion at the base
resolution), bilinear resampling down to the output size (the base is twice the output
size, so this is a 2 x 2 box filter at scale 1), a random contrast and Gaussian noise::

    base      # (K, F, R, R) uint8, R = 2 * S, glyphs of K classes in F fonts
    variants  # (K, F, 3, R, R) uint8, thinned / plain / thickened base
    sample    # (B, 1, S, S) uint8
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PARAM_NAMES = ("angle", "scale", "aspect", "shear", "shift_x", "shift_y", "stroke", "low", "high",
               "sigma")


@dataclass(frozen=True)
class Jitter:
    """Half-widths / ranges of the random per-sample transformations."""

    rotation_deg: float = 10.0
    scale: tuple[float, float] = (0.88, 1.12)  # glyph size factor
    aspect: float = 0.06  # log aspect ratio half-width
    shear: float = 0.15
    shift: float = 0.08  # in units of half the image side
    stroke: tuple[float, float] = (-0.6, 1.0)  # < 0 erode, > 0 dilate (fraction of 1 px at R)
    background: tuple[float, float] = (0.0, 0.3)
    foreground: tuple[float, float] = (0.7, 1.0)


def draw_params(n: int, noise: float, jitter: Jitter, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random per-sample parameters, each (n,) float32 (one uniform draw of (n, 10))."""
    u = torch.rand(n, len(PARAM_NAMES), generator=gen)
    spans = {
        "angle": (-jitter.rotation_deg, jitter.rotation_deg),
        "scale": (math.log(jitter.scale[0]), math.log(jitter.scale[1])),
        "aspect": (-jitter.aspect, jitter.aspect),
        "shear": (-jitter.shear, jitter.shear),
        "shift_x": (-jitter.shift, jitter.shift),
        "shift_y": (-jitter.shift, jitter.shift),
        "stroke": jitter.stroke,
        "low": jitter.background,
        "high": jitter.foreground,
        "sigma": (0.0, noise),
    }
    return {k: lo + (hi - lo) * u[:, i] for i, (k, (lo, hi)) in enumerate(spans.items())}


def inverse_affine(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Output -> input coordinate maps for affine_grid: (B, 2, 3) float32.

    Forward map A = rotate(angle) @ shear @ diag(sx, sy), then shift; we return A^-1.
    """
    angle = params["angle"] * (math.pi / 180.0)
    sx = torch.exp(params["scale"] + params["aspect"])
    sy = torch.exp(params["scale"] - params["aspect"])
    cos, sin, k = torch.cos(angle), torch.sin(angle), params["shear"]
    # A^-1 = diag(1/sx, 1/sy) @ [[1, -k], [0, 1]] @ rotate(-angle)
    a = (cos + k * sin) / sx
    b = (sin - k * cos) / sx
    c = -sin / sy
    d = cos / sy
    tx, ty = params["shift_x"], params["shift_y"]
    row0 = torch.stack([a, b, -(a * tx + b * ty)], dim=1)
    row1 = torch.stack([c, d, -(c * tx + d * ty)], dim=1)
    return torch.stack([row0, row1], dim=1)


def dilate3(x: torch.Tensor, pad_value: int = 0) -> torch.Tensor:
    """3 x 3 grey-level dilation (max filter) of x: (..., R, R) uint8."""
    p = F.pad(x, (1, 1, 1, 1), value=pad_value)
    rows = torch.maximum(torch.maximum(p[..., :-2], p[..., 1:-1]), p[..., 2:])
    return torch.maximum(torch.maximum(rows[..., :-2, :], rows[..., 1:-1, :]), rows[..., 2:, :])


def stroke_variants(base: torch.Tensor) -> torch.Tensor:
    """Thinned, plain and thickened glyphs: (K, F, R, R) uint8 -> (K, F, 3, R, R) uint8.

    Thickening is a 3 x 3 max filter at the base resolution, thinning a 3 x 3 min filter.
    """
    thin = 255 - dilate3(255 - base, pad_value=255)
    return torch.stack([thin, base, dilate3(base)], dim=2).contiguous()


def affine_grid(theta: torch.Tensor, size: int) -> torch.Tensor:
    """Sampling grid of theta (B, 2, 3) for a size x size output: (B, size, size, 2) float32.

    Same as F.affine_grid(..., align_corners=False), built with broadcast adds.
    """
    coords = (torch.arange(size, dtype=torch.float32) * 2 + 1) / size - 1
    parts = []
    for row in range(2):
        across = theta[:, row, 0, None] * coords  # (B, size): depends on output x
        down = theta[:, row, 1, None] * coords + theta[:, row, 2, None]  # (B, size): on y
        parts.append(across[:, None, :] + down[:, :, None])
    return torch.stack(parts, dim=-1)


def gather_glyphs(variants: torch.Tensor, classes: torch.Tensor, fonts: torch.Tensor,
                  stroke: torch.Tensor) -> torch.Tensor:
    """Plain and stroke-moved glyph per sample: (B, 2, R, R) float32 in [0, 1]."""
    num_fonts, size = variants.shape[1], variants.shape[-1]
    cell = (classes * num_fonts + fonts) * 3
    moved = cell + torch.where(stroke >= 0, 2, 0)
    index = torch.stack([cell + 1, moved], dim=1).view(-1)
    flat = variants.view(-1, size, size).index_select(0, index)
    return flat.view(-1, 2, size, size).to(torch.float32).div_(255.0)


def synthesize(variants: torch.Tensor, classes: torch.Tensor, fonts: torch.Tensor,
               params: dict[str, torch.Tensor], noise: torch.Tensor, size: int) -> torch.Tensor:
    """Render one batch of samples.

    variants: (K, F, 3, R, R) uint8 from stroke_variants; classes, fonts: (B,) int64;
    params: dict of (B,) float32; noise: (B, 1, size, size) float32 standard normal.
    Returns (B, 1, size, size) uint8.
    """
    glyphs = gather_glyphs(variants, classes, fonts, params["stroke"])  # (B, 2, R, R)
    grid = affine_grid(inverse_affine(params), size)
    both = F.grid_sample(glyphs, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    ink = torch.lerp(both[:, :1], both[:, 1:], params["stroke"].abs().view(-1, 1, 1, 1))
    low, high = params["low"].view(-1, 1, 1, 1), params["high"].view(-1, 1, 1, 1)
    image = low + (high - low) * ink + params["sigma"].view(-1, 1, 1, 1) * noise
    return image.clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)
