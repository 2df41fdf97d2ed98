"""Routed inference of a generalist + specialists ensemble (DESIGN §2.3, §2.5).

For a batch ``x (B, C, H, W)``:

1. ``p^g = softmax(generalist(x))`` at T = 1, ``(B, K)``;
2. active specialists ``(B, S)``: those whose group holds one of the generalist's top-``n``
   classes (:func:`specialists.combine.active_specialists`);
3. each specialist runs *only on its active examples* (gather, run, scatter): the result is
   the routed ``[(example_index (n_m,), probs (n_m, L_m + 1)), ...]`` that
   :mod:`specialists.combine` expects;
4. ``q (B, K)`` = the exact optimum of eq. 5 (:func:`specialists.combine.solve_fixed_point`).

When every specialist has a frozen trunk identical to the generalist's (``finetune="head"``),
the trunk runs once per batch and each specialist only applies its head
(:meth:`specialists.model.Specialist.head_logits`) to the gathered features.

:func:`evaluate_predictions` turns labels and top-1 predictions into the paper's report:
top-1 of both models, conditional accuracy on covered examples and the Table 4 breakdown by
the number of specialists covering the true class. Everything here is pure (no I/O).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from specialists.combine import (
    GroupMembership,
    SpecialistOutput,
    active_specialists,
    route,
    solve_fixed_point,
)
from specialists.model import Specialist

__all__ = [
    "EnsembleOutput",
    "RoutedEnsemble",
    "build_ensemble",
    "check_membership",
    "combine_routed",
    "ensemble_forward",
    "evaluate_predictions",
    "shares_trunk",
    "specialist_outputs",
]


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
) -> RoutedEnsemble:
    """Check the pieces and return a :class:`RoutedEnsemble` (models are switched to eval mode).

    ``membership`` defaults to the specialists' groups. ``share_trunk``: ``None`` detects it
    (:func:`shares_trunk` for every specialist), ``False`` always runs full specialists,
    ``True`` requires a shared trunk (``ValueError`` otherwise).
    """
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
                          top_n=top_n, tol=tol, max_iter=max_iter, dtype=dtype)


def _general(ensemble: RoutedEnsemble, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(p^g (B, K) in the ensemble's dtype, trunk features (B, D) or None)``."""
    if ensemble.shared_trunk:
        features = ensemble.generalist.forward_features(x)
        logits = ensemble.generalist.head(features)
    else:
        features, logits = None, ensemble.generalist(x)
    return torch.softmax(logits.to(ensemble.dtype), dim=1), features


def specialist_outputs(
    ensemble: RoutedEnsemble, x: Tensor, active: Tensor, features: Tensor | None = None
) -> list[SpecialistOutput]:
    """Run specialist ``m`` on the rows ``b`` with ``active[b, m]`` only: ``x (B, C, H, W)``,
    ``active (B, S)`` bool -> routed ``[(example_index (n_m,), probs (n_m, L_m + 1)), ...]``.
    With ``features (B, D)`` (shared trunk) only the heads run."""
    outputs: list[SpecialistOutput] = []
    for spec, index in zip(ensemble.specialists, route(active), strict=True):
        if index.numel() == 0:
            probs = x.new_zeros(0, len(spec.group) + 1, dtype=ensemble.dtype)
        else:
            rows = index.to(x.device)
            logits = spec.head_logits(features[rows]) if features is not None else spec(x[rows])
            probs = torch.softmax(logits.to(ensemble.dtype), dim=1)  # (n_m, L_m + 1)
        outputs.append((index, probs))
    return outputs


@torch.no_grad()
def ensemble_forward(ensemble: RoutedEnsemble, x: Tensor) -> EnsembleOutput:
    """``x (B, C, H, W)`` float in [0, 1] -> :class:`EnsembleOutput` with ``q (B, K)``.

    Raises ``ValueError`` (from :mod:`specialists.combine`) when a model emits probabilities
    that are not finite or do not sum to 1.
    """
    p_general, features = _general(ensemble, x)
    active = active_specialists(p_general, ensemble.membership, ensemble.top_n)  # (B, S)
    routed = specialist_outputs(ensemble, x, active, features)
    return combine_routed(ensemble, p_general, routed, active)


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


# ------------------------------------------------------------------------------ evaluation
def _top1(correct: Tensor) -> float:
    return float(correct.double().mean()) if correct.numel() else float("nan")


def _relative(ens_correct: int, gen_correct: int) -> float | None:
    return (ens_correct - gen_correct) / gen_correct if gen_correct else None


def _table4(coverage: Tensor, gen_ok: Tensor, ens_ok: Tensor) -> list[dict[str, Any]]:
    rows = []
    for k in range(int(coverage.max()) + 1 if coverage.numel() else 1):
        mask = coverage == k
        n, gen, ens = int(mask.sum()), int(gen_ok[mask].sum()), int(ens_ok[mask].sum())
        rows.append({
            "specialists_covering": k, "n_examples": n,
            "generalist_correct": gen, "ensemble_correct": ens, "delta_correct": ens - gen,
            "generalist_top1": gen / n if n else None, "ensemble_top1": ens / n if n else None,
            "relative_accuracy_change": _relative(ens, gen),
        })
    return rows


def evaluate_predictions(
    labels: Tensor, general_pred: Tensor, ensemble_pred: Tensor, membership: GroupMembership
) -> dict[str, Any]:
    """The paper's evaluation (section 5, Table 4) from top-1 predictions.

    Args:
        labels, general_pred, ensemble_pred: ``(N,)`` int true classes and the top-1 classes of
            the generalist and of the ensemble.
        membership: the specialists' ``(S, K)`` groups; the *coverage* of an example is the
            number of groups holding its true class (can exceed 1 with overlapping groups).

    Returns:
        ``n_examples``, ``generalist_top1``, ``ensemble_top1``, ``n_covered`` (coverage >= 1),
        ``covered_generalist_top1``, ``covered_ensemble_top1`` (conditional accuracy; NaN when
        nothing is covered) and ``table4``: one row per coverage ``k = 0 .. max`` with
        ``n_examples``, correct counts, ``delta_correct`` and ``relative_accuracy_change`` =
        ``delta_correct / generalist_correct`` (None when the generalist got none right),
        and ``per_group``: per specialist ``m``, the test examples whose true class is in
        ``S_m`` with the generalist's and the ensemble's top-1 on them (None when empty).
    """
    labels, general_pred, ensemble_pred = (t.reshape(-1).long().cpu() for t in (labels, general_pred, ensemble_pred))
    if not labels.shape == general_pred.shape == ensemble_pred.shape:
        raise ValueError(f"labels {tuple(labels.shape)}, general_pred {tuple(general_pred.shape)} and "
                         f"ensemble_pred {tuple(ensemble_pred.shape)} must all be (N,)")
    if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < membership.num_classes:
        raise ValueError(f"labels must lie in [0, {membership.num_classes}) for the membership's K")
    coverage = membership.dense(dtype=torch.long).sum(dim=0)[labels]  # (N,) groups holding the label
    gen_ok, ens_ok = general_pred == labels, ensemble_pred == labels
    covered = coverage > 0
    return {
        "n_examples": int(labels.numel()),
        "generalist_top1": _top1(gen_ok),
        "ensemble_top1": _top1(ens_ok),
        "n_covered": int(covered.sum()),
        "covered_generalist_top1": _top1(gen_ok[covered]),
        "covered_ensemble_top1": _top1(ens_ok[covered]),
        "table4": _table4(coverage, gen_ok, ens_ok),
        "per_group": _per_group(membership, labels, gen_ok, ens_ok),
    }


def _per_group(membership: GroupMembership, labels: Tensor, gen_ok: Tensor, ens_ok: Tensor) -> list[dict[str, Any]]:
    rows = []
    for m, group in enumerate(membership.groups):
        mask = torch.isin(labels, torch.tensor(group, dtype=torch.long))
        n = int(mask.sum())
        rows.append({
            "group": m, "n_examples": n,
            "generalist_top1": _top1(gen_ok[mask]) if n else None,
            "ensemble_top1": _top1(ens_ok[mask]) if n else None,
        })
    return rows
