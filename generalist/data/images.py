"""Decoding one image file (or its bytes) into the ``(C, H, W)`` uint8 array the models take."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


class ImageSizeError(ValueError):
    """An image of another size than expected, where resizing was not asked for."""


class ImageModeError(ValueError):
    """An image whose pixel values cannot be mapped to 8 bits without guessing their range."""


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")   # what Pillow makes of 16-bit grayscale


def decode_image(source: str | Path | bytes, shape: tuple[int, int, int], *, resize: bool = False,
                 name: str | None = None) -> np.ndarray:
    """Image file path or encoded bytes -> ``(C, H, W)`` uint8 for ``shape = (C, H, W)``.

    Converted to L (``C = 1``) or RGB (``C = 3``). High-bit-depth grayscale is scaled to 0..255,
    never clipped: 16-bit (Pillow modes ``I;16``, ``I;16B``, ...) and 32-bit integer (``I``) with
    values in 0..65535 as ``round(v * 255 / 65535)``, floating point (``F``) in [0, 1] as
    ``round(v * 255)``; ``I`` or ``F`` values outside those ranges raise :class:`ImageModeError`
    (their range is unknown). 48-bit RGB and 16-bit gray + alpha PNGs Pillow already reads as
    8-bit RGB / RGBA. ``resize``: scale to ``W x H`` (bilinear, aspect
    ratio not kept); otherwise an image of another size raises :class:`ImageSizeError`, checked
    before the pixels are decoded. ``name`` is what that message calls the image (default:
    ``image PATH``, or ``the image`` for bytes). Pillow's errors (``FileNotFoundError``,
    ``PIL.UnidentifiedImageError``, ``PIL.Image.DecompressionBombError``, ``OSError`` for a
    truncated file) pass through for the caller to word for its users.
    """
    channels, height, width = shape
    if channels not in (1, 3):
        raise ValueError(f"images decode to 1 (L) or 3 (RGB) channels, not {channels}")
    if name is None:
        name = "the image" if isinstance(source, bytes) else f"image {source}"
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        if not resize and image.size != (width, height):
            raise ImageSizeError(f"{name} is {image.size[0]}x{image.size[1]} pixels but the models expect "
                                 f"{width}x{height}; resize it to {width}x{height} first")
        image = _to_8bit(image, name).convert("L" if channels == 1 else "RGB")
        if resize:
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        pixels = np.array(image, dtype=np.uint8)  # (H, W) or (H, W, 3)
    return pixels[None] if channels == 1 else np.ascontiguousarray(pixels.transpose(2, 0, 1))


def _to_8bit(image: Image.Image, name: str) -> Image.Image:
    """High-bit-depth grayscale (16-bit, 32-bit integer, float) as 8-bit L, scaled (see
    :func:`decode_image`); any other image as it is."""
    if image.mode not in (*SIXTEEN_BIT_MODES, "I", "F"):
        return image
    values = np.asarray(image, dtype=np.float64)  # (H, W)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode == "F":
        if not (np.isfinite(values).all() and 0.0 <= low and high <= 1.0):
            raise ImageModeError(f"{name} is a floating-point image (mode F) with values from {low:g} "
                                 f"to {high:g}, not in [0, 1]; save it as an 8- or 16-bit image")
        full = 1.0
    else:
        if low < 0 or high > 65535:
            raise ImageModeError(f"{name} is a 32-bit integer image (mode {image.mode}) with values from "
                                 f"{low:g} to {high:g}, beyond 16 bits; save it as an 8- or 16-bit image")
        full = 65535.0
    return Image.fromarray(np.rint(values * (255.0 / full)).astype(np.uint8))  # (H, W) -> mode L
