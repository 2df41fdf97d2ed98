"""Routed inference of a generalist + specialists ensemble (DESIGN §2.3).

For a batch ``x (B, C, H, W)``:

1. ``p^g = softmax(generalist(x))`` at T = 1, ``(B, K)``;
2. active specialists ``(B, S)``: those whose group holds one of the generalist's top-``n``
   classes (:func:`specialists.ensemble.routing.active_specialists`);
3. each specialist runs *only on its active examples* (gather, run, scatter): the result is
   the routed ``[(example_index (n_m,), probs (n_m, L_m + 1)), ...]`` that
   the solvers expect (:mod:`specialists.ensemble.membership`);
4. ``q (B, K)`` = the exact optimum of eq. 5
   (:func:`specialists.ensemble.fixed_point.solve_fixed_point`).

When every specialist has a frozen trunk identical to the generalist's (``finetune="head"``),
the trunk runs once per batch and each specialist only applies its head
(:meth:`specialists.model.Specialist.head_logits`) to the gathered features.

Everything here is pure (no I/O).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from specialists.ensemble.fixed_point import solve_fixed_point
from specialists.ensemble.membership import GroupMembership, SpecialistOutput
from specialists.ensemble.routing import active_specialists, route
from specialists.model import Specialist


@dataclass(frozen=True)
class RoutedEnsemble:
    """A generalist, its specialists (``specialists[m]`` covers ``membership.groups[m]``) and the
    solver settings. Build it with :func:`build_ensemble`, which checks the pieces fit."""

    generalist: nn.Module
    specialists: tuple[Specialist, ...]
    membership: GroupMembership
    shared_trunk: bool  # compute trunk features once and call only the specialists' heads
    top_n: int = 1
    tol: float = 1e-10
    max_iter: int = 1000
    dtype: torch.dtype = torch.float64
    specialist_temperature: float = 1.0  # specialists' logits are divided by it before the softmax


@dataclass(frozen=True)
class EnsembleOutput:
    """One batch through the ensemble."""

    q: Tensor  # (B, K) combined distribution, in the ensemble's dtype
    p_general: Tensor  # (B, K) generalist probabilities at T = 1, same dtype
    active: Tensor  # (B, S) bool, specialist m active for example b
    info: dict[str, Any]  # solver diagnostics (iterations, max_change, converged, ...)


def check_membership(specialists: Sequence[Specialist], membership: GroupMembership) -> None:
    """``ValueError`` unless ``membership`` is the ``(S, K)`` matrix of these specialists: one
    group per specialist, ``K`` = the specialists' class count, groups in head order."""
    if not isinstance(membership, GroupMembership):
        raise ValueError(f"membership must be a GroupMembership, got {type(membership).__name__}; "
                         "build one with GroupMembership.from_groups([s.group for s in specialists], K)")
    if membership.num_groups != len(specialists):
        raise ValueError(f"membership has {membership.num_groups} groups (shape "
                         f"({membership.num_groups}, {membership.num_classes})) but there are "
                         f"{len(specialists)} specialists; pass one group per specialist, in order")
    for m, (spec, group) in enumerate(zip(specialists, membership.groups, strict=True)):
        if spec.num_classes != membership.num_classes:
            raise ValueError(f"membership has K={membership.num_classes} classes but specialist {m} "
                             f"was built for K={spec.num_classes}; use the generalist's class count")
        if tuple(spec.group) != tuple(group):
            raise ValueError(f"membership group {m} is {list(group)} but specialist {m} covers "
                             f"{list(spec.group)} (head order); build the membership from the specialists")


def shares_trunk(generalist: nn.Module, specialist: Specialist) -> bool:
    """True when ``specialist`` has a frozen trunk (``finetune="head"``) whose weights and buffers
    equal the generalist's, so its features are ``generalist.forward_features(x)``."""
    if not specialist.trunk_frozen:
        return False
    mine = specialist.trunk.state_dict()
    theirs = {k: v for k, v in generalist.state_dict().items() if not k.startswith("head.")}
    if mine.keys() != theirs.keys():
        return False
    return all(mine[k].shape == theirs[k].shape and torch.equal(mine[k], theirs[k].to(mine[k].device))
               for k in mine)


def build_ensemble(
    generalist: nn.Module,
    specialists: Sequence[Specialist],
    membership: GroupMembership | None = None,
    *,
    top_n: int = 1,
    tol: float = 1e-10,
    max_iter: int = 1000,
    dtype: torch.dtype = torch.float64,
    share_trunk: bool | None = None,
    specialist_temperature: float = 1.0,
) -> RoutedEnsemble:
    """Check the pieces and return a :class:`RoutedEnsemble` (models are switched to eval mode).

    ``membership`` defaults to the specialists' groups. ``share_trunk``: ``None`` detects it
    (:func:`shares_trunk` for every specialist), ``False`` always runs full specialists,
    ``True`` requires a shared trunk (``ValueError`` otherwise). ``specialist_temperature`` > 1
    softens the specialists (trained on few examples, they are over-confident) before combining.
    """
    if not specialist_temperature > 0:
        raise ValueError(f"specialist_temperature must be > 0, got {specialist_temperature}")
    specialists = tuple(specialists)
    num_classes = generalist.head.out_features
    if membership is None:
        membership = GroupMembership.from_groups([s.group for s in specialists], num_classes)
    if membership.num_classes != num_classes:
        raise ValueError(f"membership has K={membership.num_classes} classes but the generalist "
                         f"predicts {num_classes}; build the membership for the generalist's classes")
    check_membership(specialists, membership)
    shared = bool(specialists) and all(shares_trunk(generalist, s) for s in specialists)
    if share_trunk and not shared:
        raise ValueError("share_trunk=True needs specialists trained with finetune='head' from this "
                         "generalist (frozen, identical trunks); pass share_trunk=None to detect it")
    generalist.eval()
    for spec in specialists:
        spec.eval()
    return RoutedEnsemble(generalist, specialists, membership, shared and share_trunk is not False,
                          top_n=top_n, tol=tol, max_iter=max_iter, dtype=dtype,
                          specialist_temperature=float(specialist_temperature))


def _general(ensemble: RoutedEnsemble, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(p^g (B, K) in the ensemble's dtype, trunk features (B, D) or None)``."""
    if ensemble.shared_trunk:
        features = ensemble.generalist.forward_features(x)
        logits = ensemble.generalist.head(features)
    else:
        features, logits = None, ensemble.generalist(x)
    return torch.softmax(logits.to(ensemble.dtype), dim=1), features


def specialist_logits(
    ensemble: RoutedEnsemble, x: Tensor, active: Tensor, features: Tensor | None = None
) -> list[tuple[Tensor, Tensor]]:
    """Run specialist ``m`` on the rows ``b`` with ``active[b, m]`` only: ``x (B, C, H, W)``,
    ``active (B, S)`` bool -> ``[(example_index (n_m,), logits (n_m, L_m + 1)), ...]`` in the
    ensemble's dtype. With ``features (B, D)`` (shared trunk) only the heads run."""
    routed: list[tuple[Tensor, Tensor]] = []
    for spec, index in zip(ensemble.specialists, route(active), strict=True):
        if index.numel() == 0:
            logits = x.new_zeros(0, len(spec.group) + 1, dtype=ensemble.dtype)
        else:
            rows = index.to(x.device)
            logits = spec.head_logits(features[rows]) if features is not None else spec(x[rows])
        routed.append((index, logits.to(ensemble.dtype)))
    return routed


def soften(routed_logits: Sequence[tuple[Tensor, Tensor]], temperature: float) -> list[SpecialistOutput]:
    """The routed specialists' probabilities at ``temperature``: ``softmax(logits / T)`` per row."""
    return [(index, torch.softmax(logits / temperature, dim=1)) for index, logits in routed_logits]


def specialist_outputs(
    ensemble: RoutedEnsemble, x: Tensor, active: Tensor, features: Tensor | None = None
) -> list[SpecialistOutput]:
    """Run specialist ``m`` on the rows ``b`` with ``active[b, m]`` only: ``x (B, C, H, W)``,
    ``active (B, S)`` bool -> routed ``[(example_index (n_m,), probs (n_m, L_m + 1)), ...]``
    at the ensemble's ``specialist_temperature``. With ``features (B, D)`` only the heads run."""
    return soften(specialist_logits(ensemble, x, active, features), ensemble.specialist_temperature)


@torch.no_grad()
def ensemble_forward(ensemble: RoutedEnsemble, x: Tensor) -> EnsembleOutput:
    """``x (B, C, H, W)`` float in [0, 1] -> :class:`EnsembleOutput` with ``q (B, K)``.

    Raises ``ValueError`` (from :mod:`specialists.ensemble.validation`) when a model emits probabilities
    that are not finite or do not sum to 1.
    """
    return ensemble_forward_at(ensemble, x, (ensemble.specialist_temperature,))[0]


@torch.no_grad()
def ensemble_forward_at(ensemble: RoutedEnsemble, x: Tensor,
                        temperatures: Sequence[float]) -> list[EnsembleOutput]:
    """:func:`ensemble_forward` of ``x`` at each specialist temperature in ``temperatures``, the
    models run once: the same outputs as ``ensemble_forward(replace(ensemble,
    specialist_temperature=t), x)`` for each ``t``, at about the cost of one of them."""
    p_general, features = _general(ensemble, x)
    active = active_specialists(p_general, ensemble.membership, ensemble.top_n)  # (B, S)
    logits = specialist_logits(ensemble, x, active, features)
    return [combine_routed(ensemble, p_general, soften(logits, t), active) for t in temperatures]


def combine_routed(
    ensemble: RoutedEnsemble,
    p_general: Tensor,
    routed: Sequence[SpecialistOutput],
    active: Tensor | None = None,
) -> EnsembleOutput:
    """Combine already computed outputs: ``p_general (B, K)``, the routed specialist outputs and
    the ``(B, S)`` ``active`` mask (default: from ``p_general`` and ``ensemble.top_n``).

    Raises ``ValueError`` when probabilities are not finite or a row does not sum to 1.
    """
    if active is None:
        active = active_specialists(p_general, ensemble.membership, ensemble.top_n)
    q, info = solve_fixed_point(p_general, routed, active, ensemble.membership,
                                tol=ensemble.tol, max_iter=ensemble.max_iter, dtype=ensemble.dtype)
    return EnsembleOutput(q=q, p_general=p_general.to(ensemble.dtype), active=active, info=info)
