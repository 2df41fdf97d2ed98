"""Combine a generalist with its specialists (Hinton, Vinyals & Dean 2015, section 5, eq. 5).

For each example, with ``p^g (K,)`` the generalist's distribution and ``A`` the active
specialists (those whose group holds one of the generalist's top-``n`` classes), find the full
distribution ``q`` over ``K`` classes minimising

    F(q) = KL(p^g || q) + sum_{m in A} KL(p^m || q~^m),

``q~^m`` being ``q`` collapsed onto group ``m`` + dustbin (the dustbin takes the mass of every
class outside the group). ``F`` is convex in ``q``; :func:`solve_fixed_point` solves it in batch
with the exact EM fixed-point iteration accelerated by SQUAREM, :func:`solve_reference` by
per-example gradient descent on logits as in the paper.

``specialist_probs`` are *routed* ``(example_index (n_m,), probs (n_m, |S_m| + 1))`` pairs, one
per specialist; see :mod:`specialists.combine_inputs`. Inputs are validated (``ValueError``),
cast to ``dtype`` (``float64`` by default; ``float32`` also works) and renormalised per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from specialists.combine_inputs import (
    GroupMembership,
    SpecialistOutput,
    active_specialists,
    check_dtype,
    check_prob_rows,
    normalized,
    route,
    routed_from_dense,
    validate_problem,
)
from specialists.combine_problem import build_dense, build_sparse, expand, gather_pairs
from specialists.combine_reference import solve_reference
from specialists.combine_solver import FixedPointResult, effective_tol, run_fixed_point

__all__ = [
    "GroupMembership",
    "SpecialistOutput",
    "active_specialists",
    "collapse",
    "combine",
    "combine_objective",
    "route",
    "routed_from_dense",
    "soft_targets",
    "solve_fixed_point",
    "solve_reference",
    "teacher_logits",
]

_SPARSE_MAX_DENSITY = 0.5


def _check_q(q: Tensor, membership: GroupMembership) -> None:
    if q.dim() != 2 or q.shape[1] != membership.num_classes:
        raise ValueError(f"q must be (B, {membership.num_classes}), got shape {tuple(q.shape)}")


def collapse(q: Tensor, membership: GroupMembership) -> list[Tensor]:
    """``q (B, K)`` -> per specialist ``(B, |S_m| + 1)``: ``q`` on the group's classes in head
    order, then the dustbin mass ``sum_{j not in S_m} q_j`` (summed directly, no cancellation)."""
    _check_q(q, membership)
    dust = q @ (1 - membership.dense(q.device, q.dtype)).T  # (B, S)
    groups = membership.padded_groups(q.device)
    return [
        torch.cat([q[:, groups[m, :size]], dust[:, m : m + 1]], dim=1)
        for m, size in enumerate(membership.sizes)
    ]


def combine_objective(
    q: Tensor,
    p_general: Tensor,
    specialist_probs: Sequence[SpecialistOutput],
    active: Tensor,
    membership: GroupMembership,
    *,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """``(B,)`` value of ``F(q)`` (in ``dtype``) for ``q (B, K)`` and the ``(B, S)`` bool
    ``active`` mask; ``+inf`` where ``q`` gives zero mass to an event with positive target."""
    check_dtype(dtype)
    validate_problem(p_general, specialist_probs, active, membership)
    _check_q(q, membership)
    if q.shape[0] != p_general.shape[0]:
        raise ValueError(f"q has {q.shape[0]} rows but p_general has {p_general.shape[0]}")
    check_prob_rows("q", q)
    device = p_general.device
    qd = normalized(q, dtype, device)
    general = normalized(p_general, dtype, device)
    value = (torch.xlogy(general, general) - torch.xlogy(general, qd)).sum(dim=1)
    outside = 1 - membership.dense(device, dtype)  # (S, K)
    groups = membership.padded_groups(device)
    for m, (index, probs) in enumerate(specialist_probs):
        index = index.to(device=device, dtype=torch.long)
        selected = active.to(device)[index, m]
        rows = index[selected]
        target = normalized(probs[selected.to(probs.device)], dtype, device)  # (n, |S_m| + 1)
        q_rows = qd[rows]
        collapsed = torch.cat([q_rows[:, groups[m, : membership.sizes[m]]], (q_rows @ outside[m]).unsqueeze(1)], dim=1)
        value.index_add_(0, rows, (torch.xlogy(target, target) - torch.xlogy(target, collapsed)).sum(dim=1))
    return value


def _prefer_sparse(membership: GroupMembership) -> bool:
    density = sum(membership.sizes) / max(1, membership.num_groups * membership.num_classes)
    return density <= _SPARSE_MAX_DENSITY


def _info(result: FixedPointResult | None, sparse: bool, tol: float, rows: Tensor, batch: int) -> dict[str, Any]:
    if result is None:
        return {"iterations": 0, "max_change": 0.0, "converged": True, "sparse": sparse, "tol": tol}
    info: dict[str, Any] = {
        "iterations": int(result.iterations.max()),
        "max_change": float(result.residual.max()),
        "converged": bool(result.converged.all()),
        "sparse": sparse,
        "tol": tol,
    }
    if result.history is not None:
        full = result.q.new_zeros(len(result.history), batch)
        full[:, rows] = torch.stack(result.history)
        info["objective_history"] = full  # (iterations + 1, B)
    return info


def solve_fixed_point(
    p_general: Tensor,
    specialist_probs: Sequence[SpecialistOutput],
    active: Tensor,
    membership: GroupMembership,
    *,
    tol: float = 1e-12,
    max_iter: int = 1000,
    accelerate: bool = True,
    sparse: bool | None = None,
    dtype: torch.dtype = torch.float64,
    record_objective: bool = False,
) -> tuple[Tensor, dict[str, Any]]:
    """Exact optimum ``q (B, K)`` of eq. 5 by the EM fixed-point iteration (SQUAREM if
    ``accelerate``) for ``p_general (B, K)`` and the ``(B, S)`` bool ``active`` mask.

    Stops a row once an EM step moves no coordinate by more than ``tol`` (raised to ``4 eps``
    of ``dtype``). ``sparse``: ``True`` works per row on the union of its active groups plus one
    lumped "everything else" coordinate (exact, index gather/scatter), ``False`` on all ``K``
    classes with the dense ``(S, K)`` membership; ``None`` picks sparse unless groups cover more
    than half of the ``S x K`` membership matrix. Rows with no active specialist are
    ``p_general`` unchanged (cast to ``dtype``).

    ``info``: ``iterations`` (max over rows), ``max_change`` (largest final residual),
    ``converged`` (all rows), ``sparse``, ``tol`` (effective) and, if ``record_objective``,
    ``objective_history`` ``(iterations + 1, B)``: ``F`` at the start and after each iteration
    (a row keeps its final value once it has converged).
    """
    check_dtype(dtype)
    validate_problem(p_general, specialist_probs, active, membership)
    if not tol > 0 or max_iter < 1:
        raise ValueError(f"tol must be > 0 and max_iter >= 1, got tol={tol}, max_iter={max_iter}")
    device, batch = p_general.device, p_general.shape[0]
    active = active.to(device)
    use_sparse = _prefer_sparse(membership) if sparse is None else bool(sparse)
    tol = effective_tol(tol, dtype)
    p = p_general.to(dtype=dtype)
    rows = active.any(dim=1).nonzero().squeeze(1)
    if rows.numel() == 0:
        info = _info(None, use_sparse, tol, rows, batch)
        if record_objective:
            info["objective_history"] = p.new_zeros(1, batch)
        return p.clone(), info
    pairs = gather_pairs(active[rows], rows, batch, specialist_probs, membership, dtype)
    run = {"tol": tol, "max_iter": max_iter, "accelerate": accelerate, "record": record_objective}
    if use_sparse:
        problem, lumping = build_sparse(p, rows, pairs, membership)
        result = run_fixed_point(problem, **run)
        q = expand(result.q, p, lumping)
    else:
        problem = build_dense(normalized(p[rows], dtype, device), pairs, membership)
        result = run_fixed_point(problem, **run)
        q = p.clone()
        q[rows] = result.q
    return q, _info(result, use_sparse, tol, rows, batch)


def combine(
    p_general: Tensor,
    specialist_probs: Sequence[SpecialistOutput],
    membership: GroupMembership,
    *,
    top_n: int = 1,
    tol: float = 1e-12,
    max_iter: int = 1000,
    accelerate: bool = True,
    sparse: bool | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """``(B, K)`` combined distribution: active set from the generalist's top-``top_n``
    classes (:func:`active_specialists`), then :func:`solve_fixed_point`."""
    active = active_specialists(p_general, membership, top_n)
    q, _ = solve_fixed_point(
        p_general, specialist_probs, active, membership,
        tol=tol, max_iter=max_iter, accelerate=accelerate, sparse=sparse, dtype=dtype,
    )
    return q


def teacher_logits(q: Tensor, min_prob: float | None = None) -> Tensor:
    """``(B, K)`` ``log q`` with ``q`` clamped to ``min_prob`` (default: smallest normal number
    of the dtype) so that the logits are finite."""
    floor = torch.finfo(q.dtype).tiny if min_prob is None else float(min_prob)
    if not floor > 0:
        raise ValueError(f"min_prob must be > 0, got {min_prob}")
    return q.clamp_min(floor).log()


def soft_targets(q: Tensor, temperature: float) -> Tensor:
    """``(B, K)`` ``softmax(log q / T)``: the teacher's distribution at temperature ``T``."""
    if not (temperature > 0 and temperature < float("inf")):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    return torch.softmax(teacher_logits(q) / temperature, dim=-1)
