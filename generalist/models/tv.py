"""torchvision classification models (``tv.<name>``, ``weights=None``) wrapped as :class:`Classifier`.

Each supported architecture is split into ``stem`` (normalisation + first layers), ``blocks`` (its
stages, in order), ``pool`` (global pooling + flatten + any pre-classifier layers of the original
classifier) and ``head`` (the original final ``nn.Linear``, built with ``num_classes`` outputs).
The first convolution is rebuilt for ``in_channels``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torchvision
from torch import nn

from generalist.models.base import Classifier, Normalize

__all__ = ["adapt_first_conv", "build_torchvision_model", "supported_torchvision_models", "wrap_torchvision_model"]

# name prefix -> splitter; checked in order (longest/most specific first)
_Parts = tuple[
    list[nn.Module], list[nn.Module], list[nn.Module], nn.Linear
]  # stem, blocks, pool, head


def _split_resnet(m: nn.Module) -> _Parts:  # resnet*, resnext*, wide_resnet*
    stem = [m.conv1, m.bn1, m.relu, m.maxpool]
    return stem, [m.layer1, m.layer2, m.layer3, m.layer4], [m.avgpool, nn.Flatten(1)], m.fc


def _classifier_parts(m: nn.Module, avgpool: nn.Module) -> tuple[list[nn.Module], nn.Linear]:
    """Pool = avgpool (+ flatten unless the classifier flattens) + every classifier layer but the last."""
    layers = list(m.classifier)
    neck = layers[:-1]
    flatten = [] if any(isinstance(layer, nn.Flatten) for layer in neck) else [nn.Flatten(1)]
    return [avgpool, *flatten, *neck], layers[-1]


def _split_features(m: nn.Module) -> _Parts:  # mobilenet_v2/v3, efficientnet*, convnext*
    pool, head = _classifier_parts(m, getattr(m, "avgpool", nn.AdaptiveAvgPool2d(1)))
    features = list(m.features)
    return [features[0]], features[1:], pool, head


def _split_vgg(m: nn.Module) -> _Parts:
    stages: list[list[nn.Module]] = [[]]
    for layer in m.features:
        stages[-1].append(layer)
        if isinstance(layer, nn.MaxPool2d):
            stages.append([])
    groups = [nn.Sequential(*s) for s in stages if s]
    pool, head = _classifier_parts(m, m.avgpool)
    return [groups[0]], groups[1:], pool, head


def _split_mnasnet(m: nn.Module) -> _Parts:
    layers = list(m.layers)
    pool, head = _classifier_parts(m, nn.AdaptiveAvgPool2d(1))
    return layers[:8], [*layers[8:14], nn.Sequential(*layers[14:])], pool, head


def _split_shufflenet(m: nn.Module) -> _Parts:
    blocks = [m.stage2, m.stage3, m.stage4, m.conv5]
    return [m.conv1, m.maxpool], blocks, [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)], m.fc


def _split_regnet(m: nn.Module) -> _Parts:
    return [m.stem], list(m.trunk_output), [m.avgpool, nn.Flatten(1)], m.fc


def _split_densenet(m: nn.Module) -> _Parts:
    names = [name for name, _ in m.features.named_children()]
    layers = list(m.features)
    first_block = next(i for i, n in enumerate(names) if n.startswith("denseblock"))
    blocks: list[nn.Module] = []
    current: list[nn.Module] = []
    for name, layer in zip(names[first_block:], layers[first_block:], strict=True):
        if name.startswith("denseblock") and current:
            blocks.append(nn.Sequential(*current))
            current = []
        current.append(layer)
    blocks.append(nn.Sequential(*current))
    pool = [nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
    return layers[:first_block], blocks, pool, m.classifier


_SPLITTERS: tuple[tuple[str, Callable[[nn.Module], _Parts]], ...] = (
    ("resnet", _split_resnet),
    ("resnext", _split_resnet),
    ("wide_resnet", _split_resnet),
    ("mobilenet_v", _split_features),
    ("efficientnet_", _split_features),
    ("convnext_", _split_features),
    ("vgg", _split_vgg),
    ("mnasnet", _split_mnasnet),
    ("shufflenet_v2", _split_shufflenet),
    ("regnet_", _split_regnet),
    ("densenet", _split_densenet),
)


def _splitter(name: str) -> Callable[[nn.Module], _Parts] | None:
    return next((fn for prefix, fn in _SPLITTERS if name.startswith(prefix)), None)


@functools.cache
def supported_torchvision_models() -> tuple[str, ...]:
    """Sorted torchvision classification model names (without ``tv.``) that can be wrapped."""
    names = torchvision.models.list_models(module=torchvision.models)
    return tuple(sorted(n for n in names if _splitter(n) is not None))


def adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    """Replace the first ``nn.Conv2d`` (in module order) by one reading ``in_channels`` channels."""
    for parent in model.modules():
        for child_name, conv in parent.named_children():
            if isinstance(conv, nn.Conv2d):
                if conv.in_channels != in_channels:
                    new = nn.Conv2d(
                        in_channels,
                        conv.out_channels,
                        conv.kernel_size,
                        stride=conv.stride,
                        padding=conv.padding,
                        dilation=conv.dilation,
                        bias=conv.bias is not None,
                        padding_mode=conv.padding_mode,
                    )
                    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
                    if new.bias is not None:
                        nn.init.zeros_(new.bias)
                    setattr(parent, child_name, new)
                return
    raise ValueError("model has no Conv2d to adapt to in_channels")


def build_torchvision_model(name: str) -> Callable[..., Classifier]:
    """Builder for ``tv.<name>`` with the registry's signature; extra kwargs go to torchvision."""
    splitter = _splitter(name)
    if splitter is None:
        raise ValueError(f"torchvision model {name!r} is not supported")

    def build(
        *,
        num_classes: int,
        in_channels: int,
        image_size: int,
        width: float,
        depth: float,
        mean: float | Sequence[float] = 0.5,
        std: float | Sequence[float] = 0.5,
        **tv_kwargs: Any,
    ) -> Classifier:
        if width != 1.0 or depth != 1.0:
            raise ValueError(
                f"tv.{name} has a fixed architecture (width={width}, depth={depth} given); "
                "pick a smaller torchvision variant or the 'cnn'/'resnet' families"
            )
        if tv_kwargs.get("weights") is not None:
            raise ValueError("pretrained weights are not supported; tv.* models use weights=None")
        tv_kwargs.pop("weights", None)
        base = torchvision.models.get_model(
            name, weights=None, num_classes=num_classes, **tv_kwargs
        )
        adapt_first_conv(base, in_channels)
        return wrap_torchvision_model(name, base, in_channels, mean, std)

    return build


def wrap_torchvision_model(name: str, base: nn.Module, in_channels: int,
                           mean: float | Sequence[float] = 0.5, std: float | Sequence[float] = 0.5) -> Classifier:
    """``base`` (a torchvision ``name`` model, its weights kept) as the :class:`Classifier` that
    ``tv.<name>`` builds: the same modules, so a torchvision state dict loaded into ``base`` is
    the wrapper's."""
    splitter = _splitter(name)
    if splitter is None:
        raise ValueError(f"torchvision model {name!r} is not supported")
    stem, blocks, pool, head = splitter(base)
    return Classifier(
        nn.Sequential(Normalize(in_channels, mean, std), *stem),
        nn.Sequential(*blocks),
        nn.Sequential(*pool),
        head,
    )
