"""Plain ``conv-BN-ReLU`` stages with max-pooling between them (``cnn``, ``cnn_fast``)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from generalist.models.base import (
    Classifier,
    Normalize,
    init_conv_bn,
    make_pool,
    scale_channels,
    scale_count,
)
from generalist.models.registry import register_model

__all__ = ["build_cnn", "conv_bn_relu"]


def conv_bn_relu(in_ch: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    """``3x3 conv (no bias) -> BN -> ReLU``: ``(B, in_ch, H, W) -> (B, out_ch, H/stride, W/stride)``.

    Parameters: ``9 * in_ch * out_ch + 2 * out_ch``.
    """
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


def build_cnn(
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    width: float,
    depth: float,
    channels: Sequence[int] = (32, 64, 128),
    convs_per_stage: int = 2,
    stem_stride: int = 1,
    dropout: float = 0.0,
    mean: float | Sequence[float] = 0.5,
    std: float | Sequence[float] = 0.5,
) -> Classifier:
    """Plain CNN classifier.

    * stem: ``Normalize -> conv_bn_relu(in_channels -> c[0], stride=stem_stride)``
    * stage ``i``: (``MaxPool2d(2)`` if ``i > 0``) then ``n`` ``conv_bn_relu`` layers, the first
      mapping ``c[i-1] -> c[i]`` (``c[0] -> c[0]`` in stage 0), where
      ``c = round(channels * width)`` and ``n = round(convs_per_stage * depth)`` (both >= 1).
    * pool: global average pool (+ dropout); head: ``Linear(c[-1], num_classes)``.

    Shapes: ``(B, in_channels, H, W) -> (B, num_classes)``; features ``(B, c[-1])``.
    """
    if not channels:
        raise ValueError("channels must name at least one stage")
    if stem_stride < 1:
        raise ValueError(f"stem_stride must be >= 1, got {stem_stride}")
    smallest = image_size // stem_stride // 2 ** (len(channels) - 1)
    if smallest < 1:
        raise ValueError(
            f"image_size {image_size} is too small for stem_stride {stem_stride} and "
            f"{len(channels) - 1} poolings"
        )
    widths = [scale_channels(c, width) for c in channels]
    n = scale_count(convs_per_stage, depth)
    stem = nn.Sequential(
        Normalize(in_channels, mean, std),
        conv_bn_relu(in_channels, widths[0], stride=stem_stride),
    )
    stages: list[nn.Module] = []
    prev = widths[0]
    for i, out in enumerate(widths):
        layers: list[nn.Module] = [nn.MaxPool2d(2)] if i > 0 else []
        for _ in range(n):
            layers.append(conv_bn_relu(prev, out))
            prev = out
        stages.append(nn.Sequential(*layers))
    model = Classifier(
        stem, nn.Sequential(*stages), make_pool(dropout), nn.Linear(prev, num_classes)
    )
    init_conv_bn(model)
    return model


@register_model("cnn")
def cnn(**kwargs) -> Classifier:
    """Plain CNN at full resolution: 3 stages of 2 convs, channels (32, 64, 128) at width 1."""
    return build_cnn(**kwargs)


@register_model("cnn_fast")
def cnn_fast(**kwargs) -> Classifier:
    """CPU-friendly plain CNN: stride-2 stem, so every stage runs at 1/4 of the pixels of ``cnn``."""
    kwargs.setdefault("stem_stride", 2)
    return build_cnn(**kwargs)
