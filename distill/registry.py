"""Loss registry and a weighted combination of named distillation terms.

>>> combined = CombinedLoss(
...     {"kd": 1.0, "hint:layer3": 0.5},
...     loss_kwargs={"kd": {"temperature": 4.0, "alpha": 0.9},
...                  "hint:layer3": {"student_channels": 64, "teacher_channels": 256}},
... )
>>> total, terms = combined({
...     "kd": {"student_logits": zs, "labels": y, "teacher_logits": zt},
...     "hint:layer3": (fs, ft),
... })                                                      # doctest: +SKIP

A term name is ``"<loss>"`` or ``"<loss>:<tag>"``; the part before ``:`` selects the
registered loss, so one loss can be used on several layer pairs.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from generalist.registry import Registry

__all__ = ["LOSSES", "CombinedLoss", "create_loss", "list_losses"]

# name -> ``factory(**kwargs) -> nn.Module``; each loss registers itself next to its definition
# (``@LOSSES.register("kd")`` in distill.losses, the feature losses in distill.feature_losses).
LOSSES: Registry[Callable[..., nn.Module]] = Registry(
    "loss", hint="Register one with @LOSSES.register(name) from distill.registry."
)


def list_losses() -> list[str]:
    """Sorted names accepted by :func:`create_loss`."""
    return LOSSES.names()


def create_loss(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered loss ``name`` with constructor ``kwargs``.

    Raises:
        ValueError: unknown name (the message suggests the closest and lists the known ones) or
            arguments the constructor does not accept (the message shows its signature).
    """
    factory = LOSSES.get(name)
    signature = inspect.signature(factory)
    try:
        signature.bind(**kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments for loss {name!r}: {err}; expected {name}{signature}") from None
    return factory(**kwargs)


def _module_key(term: str) -> str:
    return term.replace(".", "_")


class CombinedLoss(nn.Module):
    """Weighted sum of named loss terms, returning the total and each term.

    Args:
        weights: term name -> weight (finite, >= 0), e.g. ``{"kd": 1.0, "hint": 0.5}``.
            A name is ``"<registered loss>"`` or ``"<registered loss>:<tag>"``.
        losses: optional prebuilt modules for some terms.
        loss_kwargs: constructor kwargs for terms built with :func:`create_loss`.

    Learnable parts (e.g. the hint regressor) are submodules: include
    ``combined.parameters()`` in the student's optimizer.
    """

    def __init__(
        self,
        weights: Mapping[str, float],
        losses: Mapping[str, nn.Module] | None = None,
        loss_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        losses = dict(losses or {})
        loss_kwargs = dict(loss_kwargs or {})
        if not weights:
            raise ValueError("weights is empty; give at least one term, e.g. {'kd': 1.0}")
        for mapping_name, mapping in (("losses", losses), ("loss_kwargs", loss_kwargs)):
            extra = sorted(set(mapping) - set(weights))
            if extra:
                raise ValueError(
                    f"{mapping_name} names terms {extra} that have no weight; add them to "
                    f"weights (terms: {sorted(weights)})"
                )
        both = sorted(set(losses) & set(loss_kwargs))
        if both:
            raise ValueError(f"terms {both} have both a prebuilt module and loss_kwargs; give one")
        self.weights: dict[str, float] = {}
        self.terms = nn.ModuleDict()
        for term, weight in weights.items():
            value = float(weight)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"weight of term {term!r} must be finite and >= 0, got {weight!r}")
            key = _module_key(term)
            if key in self.terms:
                raise ValueError(f"term names {term!r} and another collide once '.' becomes '_'")
            if term in losses:
                module = losses[term]
            else:
                module = create_loss(term.split(":", 1)[0], **dict(loss_kwargs.get(term, {})))
            self.terms[key] = module
            self.weights[term] = value

    def term_module(self, term: str) -> nn.Module:
        """The module computing ``term``."""
        return self.terms[_module_key(term)]

    def forward(
        self, inputs: Mapping[str, Mapping[str, Any] | Sequence[Any]]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Evaluate every term.

        Args:
            inputs: term name -> keyword arguments (a mapping) or positional arguments
                (a tuple/list) for that term's ``forward``.

        Returns:
            ``(total, terms)``: the weighted scalar sum (differentiable) and the
            unweighted term values, detached, for logging.
        """
        missing = sorted(set(self.weights) - set(inputs))
        extra = sorted(set(inputs) - set(self.weights))
        if missing or extra:
            raise ValueError(
                f"inputs must have exactly the terms {sorted(self.weights)}; missing "
                f"{missing}, unexpected {extra}"
            )
        total: Tensor | None = None
        values: dict[str, Tensor] = {}
        for term, weight in self.weights.items():
            module = self.terms[_module_key(term)]
            args = inputs[term]
            value = module(**args) if isinstance(args, Mapping) else module(*args)
            if not isinstance(value, Tensor) or value.dim() != 0:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"term {term!r} must return a scalar tensor, got {got}")
            values[term] = value.detach()
            total = weight * value if total is None else total + weight * value
        assert total is not None
        return total, values

    def extra_repr(self) -> str:
        return ", ".join(f"{term}={w}" for term, w in self.weights.items())
