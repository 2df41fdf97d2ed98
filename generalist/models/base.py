"""The :class:`Classifier` contract shared by every model family, plus small building helpers."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "Classifier",
    "Normalize",
    "check_multipliers",
    "init_conv_bn",
    "make_pool",
    "scale_channels",
    "scale_count",
]


def _per_channel(value: float | Sequence[float], channels: int, what: str) -> Tensor:
    """Broadcast a scalar or a length-``channels`` sequence to a ``(1, C, 1, 1)`` float tensor."""
    values = (
        [float(value)] * channels if isinstance(value, int | float) else [float(v) for v in value]
    )
    if len(values) != channels:
        raise ValueError(f"{what} has {len(values)} values but the input has {channels} channels")
    return torch.tensor(values, dtype=torch.float32).view(1, channels, 1, 1)


class Normalize(nn.Module):
    """Fixed per-channel input normalisation ``(x - mean) / std`` of [0, 1] images.

    ``mean`` and ``std`` are persistent buffers, so they travel with the state dict.
    Shapes: ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(
        self,
        channels: int,
        mean: float | Sequence[float] = 0.5,
        std: float | Sequence[float] = 0.5,
    ) -> None:
        super().__init__()
        std_t = _per_channel(std, channels, "std")
        if bool((std_t <= 0).any()):
            raise ValueError(f"std must be > 0, got {std!r}")
        self.channels = channels
        self.register_buffer("mean", _per_channel(mean, channels, "mean"))
        self.register_buffer("std", std_t)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H, W)
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


class Classifier(nn.Module):
    """``stem -> blocks -> pool -> head``.  Every model in the registry is one of these.

    Attributes:
        stem: input normalisation of [0, 1] images followed by the first layer(s).
        blocks: the trunk's stages, in order; ``blocks[-n:]`` are the last ``n`` stages.
        pool: maps the last stage's ``(B, C', h, w)`` map to ``(B, D)`` features
            (global pooling, flattening and any pre-classifier layers).
        head: ``nn.Linear(D, K)``.
        feature_dim: ``D``.
        num_classes: ``K``.
    """

    def __init__(
        self, stem: nn.Module, blocks: nn.Sequential, pool: nn.Module, head: nn.Linear
    ) -> None:
        super().__init__()
        if not isinstance(blocks, nn.Sequential):
            raise TypeError(f"blocks must be an nn.Sequential, got {type(blocks).__name__}")
        if not isinstance(head, nn.Linear):
            raise TypeError(f"head must be an nn.Linear, got {type(head).__name__}")
        self.stem = stem
        self.blocks = blocks
        self.pool = pool
        self.head = head

    @property
    def feature_dim(self) -> int:
        """``D``, the width of :meth:`forward_features` (always ``head.in_features``)."""
        return self.head.in_features

    @property
    def num_classes(self) -> int:
        """``K``, the number of logits (always ``head.out_features``)."""
        return self.head.out_features

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled features before the head: ``(B, C, H, W)`` in [0, 1] -> ``(B, D)``."""
        return self.pool(self.blocks(self.stem(x)))

    def forward(self, x: Tensor) -> Tensor:
        """Logits: ``(B, C, H, W)`` in [0, 1] -> ``(B, K)``."""
        return self.head(self.forward_features(x))


def make_pool(dropout: float = 0.0) -> nn.Sequential:
    """Global average pooling + flatten (+ optional dropout): ``(B, C, h, w) -> (B, C)``."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def check_multipliers(width: float, depth: float) -> None:
    """Raise ``ValueError`` unless ``width`` and ``depth`` are finite and > 0."""
    for what, value in (("width", width), ("depth", depth)):
        if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{what} must be a finite number > 0, got {value!r}")


def scale_channels(channels: int, width: float) -> int:
    """``round(channels * width)``, at least 1."""
    return max(1, int(round(channels * width)))


def scale_count(count: int, depth: float) -> int:
    """``round(count * depth)`` layers/blocks, at least 1."""
    return max(1, int(round(count * depth)))


def init_conv_bn(module: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) convs, unit/zero batch norms; Linear layers keep torch defaults."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
