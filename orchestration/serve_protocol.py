"""The HTTP protocol of ``specdistill serve``: requests in, answers out, no server needed.

Three ways to send images (docs/serve.md has examples): a JSON body ``{"inputs": (N, C, H, W)
nested list, "top_k": 5, "temperature": 1.0}`` (:func:`parse_json_request`), the ``np.save``
bytes of an ``(N, C, H, W)`` array (:func:`parse_npy_request`) or one image file
(:func:`parse_image_request`), the latter two with ``?top_k=&temperature=`` in the query
string (:func:`parse_options`). Each parser returns a validated :class:`Query` or raises
:class:`RequestError` with the HTTP status and a message saying what is wrong and what is
expected: 400 body that is not JSON / not an ``.npy`` file / not an image, 413 more than
``max_inputs`` images, 422 wrong shape, dtype, value range, ``top_k`` or ``temperature``.
:func:`top_k_results` turns ``q`` into the answer ``{"results": [{"top_k": [{"class": name,
"probability": p}, ...]}, ...]}``, one result per input, most probable class first.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from distill.targets import soft_targets as soften
from generalist.data.images import ImageModeError, ImageSizeError, decode_image

DEFAULT_TOP_K = 5
JSON_FIELDS = ("inputs", "top_k", "temperature")
QUERY_FIELDS = ("top_k", "temperature")
NPY_MAGIC = b"\x93NUMPY"


class RequestError(ValueError):
    """A request the server rejects: HTTP ``status`` and a message saying what is expected."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Query:
    """A validated request: ``(N, C, H, W)`` float32 images in [0, 1], top-k and temperature."""

    images: Tensor
    top_k: int
    temperature: float


def is_finite_number(value: Any) -> bool:
    """An int or float (not a bool) that is finite."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _shape_text(image_shape: tuple[int, int, int]) -> str:
    return f"(N, {', '.join(map(str, image_shape))})"


def default_top_k(num_classes: int) -> int:
    """How many classes an answer lists when the request does not say: 5, or all when fewer."""
    return min(DEFAULT_TOP_K, num_classes)


def top_k_problem(top_k: Any, num_classes: int) -> str | None:
    """Why ``top_k`` is not a number of classes to answer with (None when it is): an integer in
    [1, K]. The one rule of the HTTP API, ``specdistill query`` and ``Ensemble.soft_targets``."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_classes:
        return (f"top_k must be an integer in [1, {num_classes}] (this run has {num_classes} classes), "
                f"got {top_k!r}")
    return None


def parse_options(top_k: Any, temperature: Any, num_classes: int) -> tuple[int, float]:
    """``top_k`` (int in [1, K], default ``min(5, K)``) and ``temperature`` (> 0, default 1).

    Values may be JSON numbers or query-string text; None means the default.
    """
    k = default_top_k(num_classes) if top_k is None else _parse_top_k(top_k, num_classes)
    t = 1.0 if temperature is None else _parse_temperature(temperature)
    return k, t


def _parse_top_k(top_k: Any, num_classes: int) -> int:
    if isinstance(top_k, str):
        try:
            top_k = int(top_k)
        except ValueError:
            raise RequestError(422, f"top_k must be an integer in [1, {num_classes}], got {top_k!r}") from None
    if isinstance(top_k, float) and top_k.is_integer():
        top_k = int(top_k)
    problem = top_k_problem(top_k, num_classes)
    if problem:
        raise RequestError(422, problem)
    return top_k


def _parse_temperature(temperature: Any) -> float:
    if isinstance(temperature, str):
        try:
            temperature = float(temperature)
        except ValueError:
            raise RequestError(422, f"temperature must be a positive finite number, got {temperature!r}") from None
    if not is_finite_number(temperature) or temperature <= 0:
        raise RequestError(422, f"temperature must be a positive finite number, got {temperature!r}")
    return float(temperature)


def check_images(array: np.ndarray, image_shape: tuple[int, int, int], max_inputs: int, *,
                 source: str = "inputs") -> Tensor:
    """``(N, C, H, W)`` uint8 (0..255) or float (in [0, 1]) array -> float32 tensor in [0, 1].

    Integer arrays are accepted when their values fit 0..255 (JSON has no uint8); 422 for a
    wrong shape, dtype or value range, 413 for more than ``max_inputs`` images.
    """
    expected = _shape_text(image_shape)
    if array.dtype.kind not in "uif":
        raise RequestError(422, f"{source} must hold numbers: uint8 0..255 or floats in [0, 1], "
                                f"got dtype {array.dtype}")
    if array.ndim == 3 and tuple(array.shape) == image_shape:
        raise RequestError(422, f"{source} must be {expected} (a batch of images), got shape "
                                f"{tuple(array.shape)}: wrap the single image in a list")
    if array.ndim != 4 or tuple(array.shape[1:]) != image_shape:
        raise RequestError(422, f"{source} must have shape {expected} (N, C, H, W) for this run's "
                                f"models, got shape {tuple(array.shape)}")
    if array.shape[0] == 0:
        raise RequestError(422, f"{source} holds no images; send at least one, shape {expected}")
    if array.shape[0] > max_inputs:
        raise RequestError(413, f"{array.shape[0]} images in one request, at most {max_inputs} "
                                f"allowed; split them over several requests")
    if array.dtype.kind in "iu":
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise RequestError(422, f"{source}: integer pixel values must be in 0..255 (uint8), got "
                                    f"values from {low} to {high}; send floats in [0, 1] instead")
        return torch.from_numpy(array.astype(np.uint8)).float() / 255
    if not np.isfinite(array).all():
        raise RequestError(422, f"{source}: float pixel values must be finite numbers in [0, 1], "
                                f"got NaN or infinity")
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 1:
        raise RequestError(422, f"{source}: float pixel values must be in [0, 1], got values from "
                                f"{low:g} to {high:g}; send uint8 0..255 (integers) or divide by 255")
    return torch.from_numpy(array.astype(np.float32))


def parse_json_request(body: bytes, image_shape: tuple[int, int, int], num_classes: int,
                       max_inputs: int) -> Query:
    """``{"inputs": nested list (N, C, H, W), "top_k": k, "temperature": T}`` -> :class:`Query`.

    JSON integers are uint8 pixels (0..255); if any number has a fraction or exponent, all are
    floats in [0, 1].
    """
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, f"body is not valid JSON ({exc}); expected "
                                f'{{"inputs": [...], "top_k": 5, "temperature": 1.0}}') from None
    if not isinstance(data, dict) or "inputs" not in data:
        got = f"keys {sorted(data)}" if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        raise RequestError(422, f'expected a JSON object {{"inputs": {_shape_text(image_shape)} nested '
                                f'list, "top_k": int, "temperature": float}}, got {got}')
    unknown = sorted(set(data) - set(JSON_FIELDS))
    if unknown:
        raise RequestError(422, f"unknown field(s) {', '.join(unknown)}; expected {', '.join(JSON_FIELDS)}")
    top_k, temperature = parse_options(data.get("top_k"), data.get("temperature"), num_classes)
    inputs = data["inputs"]
    if not isinstance(inputs, list):
        raise RequestError(422, f"inputs must be a nested list of shape {_shape_text(image_shape)}, "
                                f"got a JSON {type(inputs).__name__}")
    if len(inputs) > max_inputs:  # before building the array
        raise RequestError(413, f"{len(inputs)} images in one request, at most {max_inputs} allowed; "
                                f"split them over several requests")
    try:
        array = np.asarray(inputs)
    except (ValueError, OverflowError):
        raise RequestError(422, f"inputs is ragged or mixes lists and numbers; expected a nested list "
                                f"of numbers of shape {_shape_text(image_shape)}") from None
    if array.dtype.kind not in "iuf":
        got = {"b": "true/false", "U": "strings"}.get(array.dtype.kind, "null, huge integers or mixed types")
        raise RequestError(422, f"inputs must hold only numbers, uint8 0..255 or floats in [0, 1], "
                                f"got {got}")
    return Query(check_images(array, image_shape, max_inputs), top_k, temperature)


def parse_npy_request(body: bytes, params: Mapping[str, str], image_shape: tuple[int, int, int],
                      num_classes: int, max_inputs: int) -> Query:
    """Body = ``np.save`` bytes of an ``(N, C, H, W)`` uint8 or float array; ``params`` = query string."""
    top_k, temperature = _query_options(params, num_classes)
    if not body.startswith(NPY_MAGIC):
        what = "an .npz archive" if body.startswith(b"PK\x03\x04") else "not a .npy file"
        raise RequestError(400, f"body is {what}; send the bytes np.save writes for one array")
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise RequestError(422, "the .npy array holds Python objects; send a numeric array: "
                                    "uint8 0..255 or float in [0, 1]") from None
        raise RequestError(400, f"body is a damaged .npy file ({exc}); send the bytes np.save writes") from None
    except (OSError, EOFError) as exc:
        raise RequestError(400, f"body is a truncated .npy file ({exc}); send the bytes np.save writes") from None
    if array.dtype.names is not None or not (array.dtype == np.uint8 or array.dtype.kind == "f"):
        raise RequestError(422, f"the .npy array must be uint8 (0..255) or float (in [0, 1]), got dtype "
                                f"{array.dtype}; convert it, e.g. a.astype(np.uint8)")
    return Query(check_images(array, image_shape, max_inputs, source="the .npy array"), top_k, temperature)


def parse_image_request(body: bytes, params: Mapping[str, str], image_shape: tuple[int, int, int],
                        num_classes: int) -> Query:
    """Body = one image file (PNG, or any format Pillow reads) of the models' size."""
    top_k, temperature = _query_options(params, num_classes)
    channels, height, width = image_shape
    if channels not in (1, 3):
        raise RequestError(422, f"the models take {channels}-channel images; send an .npy array instead")
    if not body:
        raise RequestError(400, "empty body; send the bytes of one PNG image")
    try:
        array = decode_image(body, image_shape)  # (C, H, W) uint8
    except (ImageSizeError, ImageModeError) as exc:
        raise RequestError(422, str(exc)) from None
    except UnidentifiedImageError:
        raise RequestError(400, "body is not an image Pillow can read; send the bytes of one PNG file") from None
    except Image.DecompressionBombError as exc:
        raise RequestError(422, f"{exc}; the models expect {width}x{height} images") from None
    except OSError as exc:
        raise RequestError(400, f"the image is truncated or corrupt ({exc}); send a complete PNG file") from None
    return Query(torch.from_numpy(array[None]).float() / 255, top_k, temperature)


def _query_options(params: Mapping[str, str], num_classes: int) -> tuple[int, float]:
    unknown = sorted(set(params) - set(QUERY_FIELDS))
    if unknown:
        raise RequestError(422, f"unknown query parameter(s) {', '.join(unknown)}; expected "
                                f"{', '.join(QUERY_FIELDS)}")
    return parse_options(params.get("top_k"), params.get("temperature"), num_classes)


def top_k_results(q: Tensor, top_k: int, temperature: float, class_names: list[str]) -> dict[str, Any]:
    """``(n, K)`` ``q`` at ``T = 1`` -> the response: per row the ``top_k`` softened probabilities."""
    probs = q if temperature == 1.0 else soften(q, temperature)
    values, ids = probs.topk(top_k, dim=1)
    return {"results": [
        {"top_k": [{"class": class_names[c], "probability": p} for p, c in zip(v, i, strict=True)]}
        for v, i in zip(values.tolist(), ids.tolist(), strict=True)
    ]}
