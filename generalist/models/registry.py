"""timm-style model registry: ``register_model`` / ``create_model`` / ``list_models``."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, Protocol

from generalist.models.base import Classifier, check_multipliers

__all__ = ["ModelBuilder", "create_model", "list_models", "register_model"]

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


_REGISTRY: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator registering ``builder`` under ``name``; names must be unique and not start with ``tv.``."""
    if not name or name.startswith(TV_PREFIX):
        raise ValueError(
            f"invalid model name {name!r} (empty, or uses the reserved {TV_PREFIX!r} prefix)"
        )

    def decorator(builder: ModelBuilder) -> ModelBuilder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return decorator


def list_models() -> list[str]:
    """All creatable names: registered families (sorted) followed by the supported ``tv.<name>`` models."""
    from generalist.models.tv import supported_torchvision_models

    return sorted(_REGISTRY) + [TV_PREFIX + n for n in supported_torchvision_models()]


def _unknown_model_error(name: str) -> ValueError:
    known = list_models()
    lowered = {k.lower(): k for k in known}
    closest = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.0)
    hint = f" Did you mean {lowered[closest[0]]!r}?" if closest else ""
    return ValueError(f"Unknown model {name!r}.{hint} Known models: {', '.join(known)}")


def _check_positive_int(what: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")


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
    if name.startswith(TV_PREFIX):
        from generalist.models.tv import build_torchvision_model, supported_torchvision_models

        if name[len(TV_PREFIX) :] not in supported_torchvision_models():
            raise _unknown_model_error(name)
        builder: ModelBuilder = build_torchvision_model(name[len(TV_PREFIX) :])
    elif name in _REGISTRY:
        builder = _REGISTRY[name]
    else:
        raise _unknown_model_error(name)
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
