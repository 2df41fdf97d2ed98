"""CIFAR-style ResNet: 3x3 stem, 3 stages of basic blocks (He et al. 2016, section 4.2)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from generalist.models.base import (
    Classifier,
    Normalize,
    init_conv_bn,
    make_pool,
    scale_channels,
    scale_count,
)
from generalist.models.registry import register_model

__all__ = ["BasicBlock", "build_resnet"]


class BasicBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``; projection shortcut when the shape changes.

    Shapes: ``(B, in_ch, H, W) -> (B, out_ch, H/stride, W/stride)``.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: Tensor) -> Tensor:  # (B, in_ch, H, W) -> (B, out_ch, H', W')
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def build_resnet(
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    width: float,
    depth: float,
    channels: Sequence[int] = (16, 32, 64),
    blocks_per_stage: int = 3,
    stem_stride: int = 1,
    zero_init_residual: bool = True,
    dropout: float = 0.0,
    mean: float | Sequence[float] = 0.5,
    std: float | Sequence[float] = 0.5,
) -> Classifier:
    """CIFAR ResNet; width 1 / depth 1 is ResNet-20 (``6 * 3 + 2`` layers).

    * stem: ``Normalize -> 3x3 conv (in_channels -> c[0], stride=stem_stride) -> BN -> ReLU``
    * stage ``i``: ``n`` :class:`BasicBlock` s, the first with stride 2 for ``i > 0``, where
      ``c = round(channels * width)`` and ``n = round(blocks_per_stage * depth)`` (both >= 1).
    * pool: global average pool (+ dropout); head: ``Linear(c[-1], num_classes)``.

    ``zero_init_residual`` starts every block as the identity (last BN gamma = 0).
    Shapes: ``(B, in_channels, H, W) -> (B, num_classes)``; features ``(B, c[-1])``.
    """
    if not channels:
        raise ValueError("channels must name at least one stage")
    if stem_stride < 1:
        raise ValueError(f"stem_stride must be >= 1, got {stem_stride}")
    if image_size // stem_stride // 2 ** (len(channels) - 1) < 1:
        raise ValueError(f"image_size {image_size} is too small for {len(channels)} stages")
    widths = [scale_channels(c, width) for c in channels]
    n = scale_count(blocks_per_stage, depth)
    stem = nn.Sequential(
        Normalize(in_channels, mean, std),
        nn.Conv2d(in_channels, widths[0], 3, stride=stem_stride, padding=1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(inplace=True),
    )
    stages: list[nn.Module] = []
    prev = widths[0]
    for i, out in enumerate(widths):
        blocks = [
            BasicBlock(prev if j == 0 else out, out, 2 if (i > 0 and j == 0) else 1)
            for j in range(n)
        ]
        stages.append(nn.Sequential(*blocks))
        prev = out
    model = Classifier(
        stem, nn.Sequential(*stages), make_pool(dropout), nn.Linear(prev, num_classes)
    )
    init_conv_bn(model)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)
    return model


@register_model("resnet")
def resnet(**kwargs) -> Classifier:
    """CPU-friendly ResNet-20 layout (16-32-64 channels, 3 blocks per stage) with a stride-2 stem.

    The stride-2 stem runs the trunk at half resolution (16-8-4 for 32 px inputs): about 4-5x
    less compute than :func:`resnet_cifar` for the same parameters.
    """
    kwargs.setdefault("stem_stride", 2)
    return build_resnet(**kwargs)


@register_model("resnet_cifar")
def resnet_cifar(**kwargs) -> Classifier:
    """The original CIFAR ResNet-20 (He et al. 2016): full-resolution stem, 32-16-8 for 32 px inputs."""
    return build_resnet(**kwargs)
