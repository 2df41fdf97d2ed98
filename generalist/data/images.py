"""Decoding one image file (or its bytes) into the ``(C, H, W)`` uint8 array the models take."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


class ImageSizeError(ValueError):
    """An image of another size than expected, where resizing was not asked for."""


def decode_image(source: str | Path | bytes, shape: tuple[int, int, int], *, resize: bool = False,
                 name: str | None = None) -> np.ndarray:
    """Image file path or encoded bytes -> ``(C, H, W)`` uint8 for ``shape = (C, H, W)``.

    Converted to L (``C = 1``) or RGB (``C = 3``). ``resize``: scale to ``W x H`` (bilinear, aspect
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
        image = image.convert("L" if channels == 1 else "RGB")
        if resize:
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        pixels = np.array(image, dtype=np.uint8)  # (H, W) or (H, W, 3)
    return pixels[None] if channels == 1 else np.ascontiguousarray(pixels.transpose(2, 0, 1))
