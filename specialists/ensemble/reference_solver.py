"""Reference solver: per-example gradient descent on the logits of ``q`` (as in the paper).

Slow by design; it is the baseline that :func:`specialists.ensemble.fixed_point.solve_fixed_point` is checked
against. Each example is solved on its own: ``F`` is written with ``log_softmax`` /
``logsumexp`` of the logits ``z`` (so complement masses keep full precision), the gradient comes
from autograd (independent of the fixed-point algebra), and the step size comes from
adaptive Barzilai-Borwein with a non-monotone Armijo backtracking line search (Grippo-Lampariello-Lucidi,
memory 10). It stops when ``max_j |dF/dz_j| / (1 + a) <= tol``, the same fixed-point residual
``max_j |q_j - T(q)_j|`` the production solver uses, or when ``F`` has not decreased beyond
rounding for 100 steps (working precision reached).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from specialists.ensemble.membership import GroupMembership, SpecialistOutput
from specialists.ensemble.problem import Pairs, gather_pairs
from specialists.ensemble.validation import check_dtype, normalized, validate_problem

_MEMORY = 10
_ARMIJO = 1e-4
_MAX_BACKTRACKS = 60
_ABB_RATIO = 0.5
_MIN_STEP, _MAX_STEP = 1e-12, 1e12
_PATIENCE = 100  # steps without a decrease of F beyond rounding before giving up


def solve_reference(
    p_general: Tensor,
    specialist_probs: Sequence[SpecialistOutput],
    active: Tensor,
    membership: GroupMembership,
    *,
    tol: float = 1e-10,
    max_steps: int = 20_000,
    lr: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """``(B, K)`` optimum of eq. 5 by gradient descent per example (``lr``: first step size).

    Rows with no active specialist are returned as ``p_general`` (in ``dtype``)."""
    check_dtype(dtype)
    validate_problem(p_general, specialist_probs, active, membership)
    if tol <= 0 or max_steps < 1 or lr <= 0:
        raise ValueError("tol and lr must be > 0 and max_steps >= 1")
    device = p_general.device
    active = active.to(device)
    q = p_general.to(dtype=dtype, copy=True)
    rows = active.any(dim=1).nonzero().squeeze(1)
    if rows.numel() == 0:
        return q
    general = normalized(p_general[rows], dtype, device)
    pairs = gather_pairs(active[rows], rows, q.shape[0], specialist_probs, membership, dtype)
    ends = torch.bincount(pairs.row, minlength=rows.numel()).cumsum(0).tolist()
    start = 0
    for i, end in enumerate(ends):
        value = _row_objective(general[i], pairs, start, end, membership)
        z = _descend(value, general[i].clamp_min(torch.finfo(dtype).tiny).log(), end - start, tol, max_steps, lr)
        q[rows[i]] = torch.softmax(z, dim=0)
        start = end
    return q


def _row_objective(
    general: Tensor, pairs: Pairs, start: int, end: int, membership: GroupMembership
) -> Callable[[Tensor], Tensor]:
    """``F`` (minus its constant) of one example as a function of the logits ``z (K,)``."""
    classes = membership.padded_groups(general.device)[pairs.group[start:end]]  # (a, max L)
    b = general.clone()
    inside = torch.zeros(end - start, general.shape[0], dtype=torch.bool, device=general.device)
    for k in range(end - start):
        members = classes[k][classes[k] >= 0]
        b[members] += pairs.in_group[start + k, : members.numel()]
        inside[k, members] = True
    dust = pairs.dust[start:end]

    def value(z: Tensor) -> Tensor:
        log_q = torch.log_softmax(z, dim=0)
        log_out = torch.logsumexp(z.masked_fill(inside, float("-inf")), dim=1) - torch.logsumexp(z, dim=0)
        return -(b * log_q).sum() - (dust * log_out).sum()

    return value


def _value_grad(value: Callable[[Tensor], Tensor], z: Tensor) -> tuple[float, Tensor]:
    z = z.detach().requires_grad_(True)
    f = value(z)
    (grad,) = torch.autograd.grad(f, z)
    return float(f.detach()), grad


def _descend(
    value: Callable[[Tensor], Tensor], z: Tensor, active: int, tol: float, max_steps: int, lr: float
) -> Tensor:
    """Barzilai-Borwein gradient descent with a non-monotone line search; returns logits."""
    f, grad = _value_grad(value, z)
    recent, step = [f], lr
    slack = 4 * torch.finfo(z.dtype).eps
    best, best_at = f, 0
    for k in range(max_steps):
        if float(grad.abs().max()) <= tol * (1 + active) or k - best_at > _PATIENCE:
            break
        reference, squared = max(recent[-_MEMORY:]), float(grad.square().sum())
        for _ in range(_MAX_BACKTRACKS):
            z_new = z - step * grad
            f_new, grad_new = _value_grad(value, z_new)
            if f_new <= reference - _ARMIJO * step * squared + slack * abs(reference):
                break
            step *= 0.5
        else:
            break  # no decrease is representable any more
        step = _abb_step(z_new - z, grad_new - grad, step)
        z, grad = z_new, grad_new
        recent.append(f_new)
        if f_new < best - slack * abs(best):
            best, best_at = f_new, k
    return z.detach()


def _abb_step(s: Tensor, y: Tensor, step: float) -> float:
    """Adaptive Barzilai-Borwein step (Frassoldati, Zanni & Zanghirati 2008): the short BB2
    step when it is much shorter than BB1, else BB1; doubles ``step`` without curvature."""
    sy = float((s * y).sum())
    if sy <= 0:
        return min(2 * step, _MAX_STEP)
    long_step, short_step = float(s.square().sum()) / sy, sy / float(y.square().sum())
    chosen = short_step if short_step < _ABB_RATIO * long_step else long_step
    return min(max(chosen, _MIN_STEP), _MAX_STEP)
