"""Decoding one image (generalist/data/images.py): from a path or bytes, L or RGB, exact size or resized."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from generalist.data.images import ImageModeError, ImageSizeError, decode_image


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


RGB = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]],
                [[10, 20, 30], [0, 0, 0], [255, 255, 255]]], dtype=np.uint8)  # (H=2, W=3, 3)


def test_rgb_bytes_and_path_decode_to_channels_first(tmp_path):
    out = decode_image(_png(RGB), (3, 2, 3))
    assert out.dtype == np.uint8 and out.shape == (3, 2, 3)
    assert np.array_equal(out, RGB.transpose(2, 0, 1))
    (tmp_path / "a.png").write_bytes(_png(RGB))
    assert np.array_equal(decode_image(tmp_path / "a.png", (3, 2, 3)), out)


def test_greyscale_uses_pillow_luminance():
    out = decode_image(_png(RGB), (1, 2, 3))
    # L = (299 R + 587 G + 114 B) / 1000, rounded: red 76, green 150, blue 29, (10, 20, 30) -> 18
    assert out.shape == (1, 2, 3) and out[0].tolist() == [[76, 150, 29], [18, 0, 255]]


def test_wrong_size_is_an_error_unless_resizing(tmp_path):
    with pytest.raises(ImageSizeError, match="the image is 3x2 pixels but the models expect 4x4; resize it to 4x4 first"):
        decode_image(_png(RGB), (3, 4, 4))
    (tmp_path / "a.png").write_bytes(_png(RGB))
    with pytest.raises(ImageSizeError, match=r"image .*a\.png is 3x2 pixels"):
        decode_image(tmp_path / "a.png", (1, 4, 4))
    flat = np.full((2, 3), 77, dtype=np.uint8)
    resized = decode_image(_png(flat), (1, 4, 4), resize=True)
    assert resized.shape == (1, 4, 4) and bool((resized == 77).all())
    with pytest.raises(ValueError, match="1 \\(L\\) or 3 \\(RGB\\) channels, not 2"):
        decode_image(_png(RGB), (2, 2, 3))


def _encoded(array: np.ndarray, fmt: str) -> tuple[bytes, str]:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue(), Image.open(io.BytesIO(buffer.getvalue())).mode


LEVELS = np.array([[0, 1, 127, 128], [200, 254, 255, 255]], dtype=np.uint16)  # (H=2, W=4) 8-bit values


@pytest.mark.parametrize(("array", "fmt", "mode"), [
    (LEVELS * 257, "PNG", "I;16"),                            # 16-bit PNG
    ((LEVELS * 257).astype(">u2"), "TIFF", "I;16B"),          # big-endian 16-bit
    ((LEVELS * 257).astype(np.int32), "TIFF", "I"),           # 32-bit integers holding 16 bits
    ((LEVELS / 255).astype(np.float32), "TIFF", "F"),         # floats in [0, 1]
])
def test_high_bit_depth_greyscale_is_scaled_to_8_bits(array, fmt, mode):
    data, opened = _encoded(array, fmt)
    assert opened == mode
    assert decode_image(data, (1, 2, 4))[0].tolist() == LEVELS.tolist()
    assert decode_image(data, (3, 2, 4))[2].tolist() == LEVELS.tolist()    # as RGB: grey on every channel


def test_high_bit_depth_values_of_unknown_range_are_refused():
    data, _ = _encoded(np.array([[0, 70000]], dtype=np.int32), "TIFF")
    with pytest.raises(ImageModeError, match=r"32-bit integer image \(mode I\) with values from 0 to 70000"):
        decode_image(data, (1, 1, 2))
    data, _ = _encoded(np.array([[-0.5, 0.5]], dtype=np.float32), "TIFF")
    with pytest.raises(ImageModeError, match=r"floating-point image \(mode F\) with values from -0.5 to 0.5"):
        decode_image(data, (1, 1, 2))
