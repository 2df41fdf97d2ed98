"""Input checks shared by the solvers and the objective: every problem is named with the rows
that have it (``ValueError``), so a model that emits bad probabilities is found quickly."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from specialists.ensemble.membership import MAX_IDS_IN_MESSAGE, GroupMembership, SpecialistOutput

PROB_ATOL = 1e-4
"""Largest accepted ``|sum(row) - 1|`` of an input probability row."""


def _rows_text(rows: Tensor) -> str:
    ids = rows.tolist()
    more = f" (+{len(ids) - MAX_IDS_IN_MESSAGE} more)" if len(ids) > MAX_IDS_IN_MESSAGE else ""
    return f"{ids[:MAX_IDS_IN_MESSAGE]}{more}"


def check_prob_rows(name: str, probs: Tensor, row_ids: Tensor | None = None, atol: float = PROB_ATOL) -> None:
    """Raise ``ValueError`` naming ``name`` and the offending rows unless every row of the
    ``(n, C)`` floating tensor is finite, non-negative and sums to 1 within ``atol``.
    ``row_ids`` ``(n,)`` are the ids to report (default: row positions)."""
    if probs.dim() != 2 or not probs.is_floating_point():
        raise ValueError(f"{name} must be a 2-D floating tensor, got {probs.dtype} {tuple(probs.shape)}")
    ids = torch.arange(probs.shape[0], device=probs.device) if row_ids is None else row_ids.to(probs.device)
    total = probs.sum(dim=1, dtype=torch.float64)  # non-finite iff the row has NaN/inf
    finite = torch.isfinite(total)
    if not bool(finite.all()):
        raise ValueError(f"{name} has NaN/inf in rows {_rows_text(ids[~finite])}")
    negative = probs.amin(dim=1) < 0 if probs.shape[1] else torch.zeros_like(finite)
    if bool(negative.any()):
        raise ValueError(f"{name} has negative probabilities in rows {_rows_text(ids[negative])}")
    off = (total - 1).abs() > atol
    if bool(off.any()):
        raise ValueError(f"{name} rows {_rows_text(ids[off])} do not sum to 1 (tolerance {atol:g})")


def check_general(p_general: Tensor, membership: GroupMembership) -> None:
    """``p_general`` must be ``(B, K)`` probabilities with ``K == membership.num_classes``."""
    if p_general.dim() != 2:
        raise ValueError(f"p_general must be (B, K), got shape {tuple(p_general.shape)}")
    if p_general.shape[1] != membership.num_classes:
        raise ValueError(
            f"p_general has {p_general.shape[1]} classes but membership.num_classes is {membership.num_classes}"
        )
    check_prob_rows("p_general", p_general)


def check_top_n(top_n: int, num_classes: int) -> None:
    """``top_n`` must be an int in ``[1, K]``."""
    if not isinstance(top_n, int) or isinstance(top_n, bool) or not 1 <= top_n <= num_classes:
        raise ValueError(f"top_n must be an int in [1, {num_classes}], got {top_n!r}")


def check_active(active: Tensor, batch: int, membership: GroupMembership) -> None:
    """``active`` must be a ``(B, S)`` bool tensor."""
    expected = (batch, membership.num_groups)
    if active.dtype != torch.bool or tuple(active.shape) != expected:
        raise ValueError(f"active must be a bool tensor of shape {expected}, got {active.dtype} {tuple(active.shape)}")


def check_specialists(
    specialist_probs: Sequence[SpecialistOutput], active: Tensor, membership: GroupMembership
) -> None:
    """Validate routed outputs against ``membership`` and the ``(B, S)`` ``active`` mask."""
    batch = active.shape[0]
    if len(specialist_probs) != membership.num_groups:
        raise ValueError(f"specialist_probs has {len(specialist_probs)} entries for {membership.num_groups} groups")
    for m, entry in enumerate(specialist_probs):
        _check_one_specialist(m, entry, membership.sizes[m], batch, active[:, m])


def _check_one_specialist(m: int, entry: SpecialistOutput, size: int, batch: int, active_m: Tensor) -> None:
    name = f"specialist_probs[{m}]"
    if not isinstance(entry, tuple | list) or len(entry) != 2:
        raise ValueError(f"{name} must be a pair (example_index (n,), probs (n, {size + 1}))")
    index, probs = entry
    if index.dim() != 1 or index.is_floating_point() or index.dtype == torch.bool:
        raise ValueError(f"{name} example_index must be a 1-D integer tensor, got {index.dtype} {tuple(index.shape)}")
    if probs.dim() != 2 or probs.shape != (index.shape[0], size + 1):
        raise ValueError(
            f"{name} probs must have shape ({index.shape[0]}, {size + 1}) (group size {size} + dustbin), "
            f"got {tuple(probs.shape)}"
        )
    index = index.to(active_m.device)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= batch):
        raise ValueError(f"{name} example_index has ids outside [0, {batch})")
    if index.unique().numel() != index.numel():
        raise ValueError(f"{name} example_index repeats example ids")
    check_prob_rows(name, probs, row_ids=index)
    covered = torch.zeros(batch, dtype=torch.bool, device=active_m.device)
    covered[index] = True
    missing = active_m & ~covered
    if bool(missing.any()):
        raise ValueError(f"specialist {m} is active for examples {_rows_text(missing.nonzero().squeeze(1))} but {name} has no row for them")


def check_dtype(dtype: torch.dtype) -> None:
    """The solvers work in float32 or float64."""
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")


def validate_problem(
    p_general: Tensor,
    specialist_probs: Sequence[SpecialistOutput],
    active: Tensor,
    membership: GroupMembership,
) -> None:
    """All checks shared by the solvers and the objective."""
    check_general(p_general, membership)
    check_active(active.to(p_general.device), p_general.shape[0], membership)
    check_specialists(specialist_probs, active.to(p_general.device), membership)


def normalized(probs: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(n, C)`` -> the same rows in ``dtype`` on ``device``, renormalised to sum to 1."""
    out = probs.to(device=device, dtype=dtype)
    return out / out.sum(dim=1, keepdim=True)
