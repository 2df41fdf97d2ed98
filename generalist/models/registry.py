"""Model families by name (timm style): ``register_model`` / ``create_model`` / ``list_models``.

Built on :class:`generalist.registry.Registry` (normalised names, "did you mean", duplicate
names refused). ``tv.<name>`` models are not registered one by one: they are resolved by
:mod:`generalist.models.tv` and listed as the registry's extra names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from generalist.models.base import Classifier, check_multipliers
from generalist.registry import Registry, normalise_name

__all__ = ["MODELS", "ModelBuilder", "create_model", "list_models", "register_model"]

TV_PREFIX = "tv."


class ModelBuilder(Protocol):
    """Signature every registered builder has (extra family-specific keyword arguments allowed)."""

    def __call__(
        self,
        *,
        num_classes: int,
        in_channels: int,
        image_size: int,
        width: float,
        depth: float,
        **kwargs: Any,
    ) -> Classifier: ...


def _torchvision_names() -> list[str]:
    from generalist.models.tv import supported_torchvision_models

    return [TV_PREFIX + n for n in supported_torchvision_models()]


MODELS: Registry[ModelBuilder] = Registry("model", extra_names=_torchvision_names)


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator registering ``builder`` under ``name``; names must be unique and not start with ``tv.``."""
    if normalise_name(name).startswith(TV_PREFIX):
        raise MODELS.error(f"invalid model name {name!r}: the {TV_PREFIX!r} prefix is reserved "
                           "for torchvision models")
    return MODELS.register(name)


def list_models() -> list[str]:
    """All creatable names: registered families (sorted) followed by the supported ``tv.<name>`` models."""
    return MODELS.names()


def _check_positive_int(what: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")


def _builder(name: str) -> ModelBuilder:
    """The registered builder of ``name``, or the torchvision wrapper for ``tv.<name>``."""
    key = normalise_name(name)
    if not key.startswith(TV_PREFIX):
        return MODELS.get(name)
    from generalist.models.tv import build_torchvision_model, supported_torchvision_models

    if key[len(TV_PREFIX):] not in supported_torchvision_models():
        raise MODELS.unknown(name)
    return build_torchvision_model(key[len(TV_PREFIX):])


def create_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    width: float = 1.0,
    depth: float = 1.0,
    **kwargs: Any,
) -> Classifier:
    """Build model ``name`` for ``(B, in_channels, image_size, image_size)`` inputs in [0, 1] with ``num_classes`` logits.

    ``width`` scales channels and ``depth`` scales layers/blocks per stage (both > 0).  Extra
    ``kwargs`` go to the family builder (e.g. ``mean``/``std`` of the input normalisation,
    ``dropout``).  Unknown names raise ``ValueError`` naming the closest known one.
    """
    _check_positive_int("num_classes", num_classes)
    _check_positive_int("in_channels", in_channels)
    _check_positive_int("image_size", image_size)
    check_multipliers(width, depth)
    builder = _builder(name)
    model = builder(
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        width=width,
        depth=depth,
        **kwargs,
    )
    if not isinstance(model, Classifier):
        raise TypeError(f"builder for {name!r} returned {type(model).__name__}, not a Classifier")
    if model.num_classes != num_classes:
        raise RuntimeError(
            f"builder for {name!r} made {model.num_classes} outputs, expected {num_classes}"
        )
    return model
