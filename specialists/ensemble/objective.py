"""The objective of eq. 5 for any candidate ``q``: ``F(q) = KL(p^g || q) + sum_{m in A}
KL(p^m || q~^m)``, ``q~^m`` being ``q`` collapsed onto group ``m`` + dustbin
(:func:`specialists.model.collapse_probs`). The solvers minimise it; this evaluates it, to check
a solution or compare solvers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from specialists.ensemble.membership import GroupMembership, SpecialistOutput
from specialists.ensemble.validation import (
    check_dtype,
    check_prob_rows,
    normalized,
    validate_problem,
)
from specialists.model import collapse_probs


def _kl_rows(target: Tensor, q: Tensor) -> Tensor:
    """``(n, C), (n, C) -> (n,)`` ``KL(target || q)``; ``+inf`` where ``q`` is 0 and ``target`` not."""
    return (torch.xlogy(target, target) - torch.xlogy(target, q)).sum(dim=1)


def combine_objective(
    q: Tensor,
    p_general: Tensor,
    specialist_probs: Sequence[SpecialistOutput],
    active: Tensor,
    membership: GroupMembership,
    *,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """``(B,)`` value of ``F(q)`` (in ``dtype``) for ``q (B, K)``, ``p_general (B, K)``, the routed
    specialist outputs and the ``(B, S)`` bool ``active`` mask; ``+inf`` where ``q`` gives zero
    mass to an event with positive target."""
    check_dtype(dtype)
    validate_problem(p_general, specialist_probs, active, membership)
    if q.dim() != 2 or q.shape[1] != membership.num_classes:
        raise ValueError(f"q must be (B, {membership.num_classes}), got shape {tuple(q.shape)}")
    if q.shape[0] != p_general.shape[0]:
        raise ValueError(f"q has {q.shape[0]} rows but p_general has {p_general.shape[0]}")
    check_prob_rows("q", q)
    device = p_general.device
    qd = normalized(q, dtype, device)  # (B, K)
    value = _kl_rows(normalized(p_general, dtype, device), qd)
    for m, (index, probs) in enumerate(specialist_probs):
        index = index.to(device=device, dtype=torch.long)
        selected = active.to(device)[index, m]
        rows = index[selected]  # (n,) examples where specialist m is active
        target = normalized(probs[selected.to(probs.device)], dtype, device)  # (n, L_m + 1)
        value.index_add_(0, rows, _kl_rows(target, collapse_probs(qd[rows], membership.groups[m])))
    return value
