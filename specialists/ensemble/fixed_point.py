"""The production solver of eq. 5: the exact EM fixed-point iteration, in batch, accelerated
with SQUAREM (:func:`solve_fixed_point`).

SQUAREM (Varadhan & Roland 2008, scheme S3), per row: from ``q0`` take two EM steps
``q1 = T(q0)``, ``q2 = T(q1)``; with ``r = q1 - q0``, ``v = q2 - 2 q1 + q0`` and
``alpha = max(1, ||r|| / ||v||)`` extrapolate ``x = q0 + 2 alpha r + alpha^2 v`` (on the simplex,
since ``r`` and ``v`` sum to 0) and stabilise with ``q3 = T(x)``. Safeguard: if ``x`` is
infeasible (a negative or non-finite entry) the row takes plain steps instead (``x = q2``, so
``q3 = T(q2)``); if ``F(x) > F(q0)`` (by more than the rounding of evaluating ``F``, a few ulps)
it falls back to the plain iterate ``q2``. EM steps never increase ``F``, so
``F(q3) <= F(x) <= F(q0)`` and ``F(q2) <= F(q0)``: ``F`` never increases beyond rounding.
``F(q0)`` and ``F(x)`` reuse the complement masses of the EM steps taken from ``q0`` and ``x``.
``alpha`` is not capped: on ill-conditioned rows (several overlapping active groups, specialists
that disagree) long steps are what make SQUAREM fast, and the safeguard rejects bad ones.

A row stops once the last EM step moved it by at most ``tol`` in every coordinate
(``max_j |T(x)_j - x_j|``, the fixed-point residual; the gradient of ``F`` in the logits of
``q`` is ``(1 + a) (q - T(q))``). Converged rows are dropped from the batch as it shrinks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from specialists.ensemble.membership import GroupMembership, SpecialistOutput
from specialists.ensemble.problem import (
    Problem,
    build_dense,
    build_sparse,
    em_step,
    expand,
    gather_pairs,
    objective,
)
from specialists.ensemble.validation import check_dtype, normalized, validate_problem

_ROUNDING = 8.0  # F(x) may exceed F(q0) by this many ulps of |F| + 2 |const| (evaluation noise)
_SPARSE_MAX_DENSITY = 0.5  # sparse layout unless groups cover more of the S x K membership


@dataclass(frozen=True)
class FixedPointResult:
    """Solution of ``R`` rows and per-row diagnostics."""

    q: Tensor  # (R, n) solution
    iterations: Tensor  # (R,) long, outer iterations used (SQUAREM cycles or plain EM steps)
    residual: Tensor  # (R,) max |q_new - q| of the last EM step
    converged: Tensor  # (R,) bool, residual <= tol
    history: list[Tensor] | None  # F (R,) at the start and after every iteration, if recorded


def effective_tol(tol: float, dtype: torch.dtype) -> float:
    """``tol`` raised to what ``dtype`` can resolve (a few ulps of 1)."""
    return max(float(tol), 4 * torch.finfo(dtype).eps)


def _max_change(new: Tensor, old: Tensor) -> Tensor:
    return (new - old).abs().amax(dim=1)


def _plain_cycle(problem: Problem, q: Tensor, tol: float, record: bool):
    new, _ = em_step(problem, q)
    return new, _max_change(new, q), objective(problem, new) if record else None


def _squarem_cycle(problem: Problem, q: Tensor, tol: float, record: bool):
    q1, mass = em_step(problem, q)
    start_value = objective(problem, q, mass)
    q2, _ = em_step(problem, q1)
    r = q1 - q
    v = q2 - q1 - r
    alpha = (r.square().sum(dim=1) / v.square().sum(dim=1)).sqrt()
    alpha = torch.nan_to_num(alpha, nan=1.0).clamp_min(1.0).unsqueeze(1)
    x = q + 2 * alpha * r + alpha.square() * v
    feasible = ((x >= 0) & torch.isfinite(x)).all(dim=1, keepdim=True)
    x = torch.where(feasible, x, q2)
    x = x / x.sum(dim=1, keepdim=True)
    q3, mass = em_step(problem, x)  # where x was infeasible: a third plain step
    plain_change = _max_change(q2, q1)
    noise = _ROUNDING * torch.finfo(q.dtype).eps * (2 * problem.const.abs() + start_value.abs())
    take = (objective(problem, x, mass) <= start_value + noise) & (plain_change > tol)
    new = torch.where(take.unsqueeze(1), q3, q2)
    change = torch.where(take, _max_change(q3, x), plain_change)
    return new, change, objective(problem, new) if record else None


def run_fixed_point(
    problem: Problem, *, tol: float, max_iter: int, accelerate: bool, record: bool
) -> FixedPointResult:
    """Iterate all rows of ``problem`` from the generalist to the fixed point."""
    q = problem.initial()  # (R, n)
    rows = q.shape[0]
    result = q.clone()
    residual = torch.full((rows,), float("inf"), dtype=q.dtype, device=q.device)
    iterations = torch.zeros(rows, dtype=torch.long, device=q.device)
    values = objective(problem, q) if record else None
    history = [values.clone()] if values is not None else None
    live = torch.arange(rows, device=q.device)  # full-batch ids of the rows being iterated
    pending = torch.ones(rows, dtype=torch.bool, device=q.device)  # of `live`: not converged
    cycle = _squarem_cycle if accelerate else _plain_cycle
    for it in range(1, max_iter + 1):
        q, change, value = cycle(problem, q, tol, record)
        ids = live[pending]
        result[ids], residual[ids], iterations[ids] = q[pending], change[pending], it
        if values is not None and history is not None:
            values[ids] = value[pending]
            history.append(values.clone())
        pending &= change > tol
        if not bool(pending.any()):
            break
        if int(pending.sum()) <= 0.75 * live.numel():
            live, problem, q = live[pending], problem.take(pending), q[pending]
            pending = torch.ones(live.numel(), dtype=torch.bool, device=q.device)
    return FixedPointResult(result, iterations, residual, residual <= tol, history)


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
