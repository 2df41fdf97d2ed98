"""Inputs of the generalist + specialists combination: group membership, routing, validation.

Notation used throughout ``specialists/combine*.py``: ``B`` examples, ``K`` classes, ``S``
specialists (groups), ``S_m`` the ordered class ids of group ``m``, ``L_m = |S_m|``.

Specialist outputs are *routed*: each specialist only runs on the examples that activate it, so
``specialist_probs`` is a sequence of length ``S`` whose entry ``m`` is a pair
``(example_index, probs)``:

* ``example_index`` -- ``(n_m,)`` integer ids of the examples (rows of ``p_general``) that
  specialist ``m`` was run on; unique, in ``[0, B)``, any order;
* ``probs`` -- ``(n_m, L_m + 1)`` the specialist's distribution for those examples: its group's
  classes in ``membership.groups[m]`` order, then the dustbin.

Every example for which specialist ``m`` is active must have a row; rows for examples where it
is not active are allowed and ignored by the solvers. :func:`route` gives the indices to run
each specialist on, and :func:`routed_from_dense` converts full ``(B, L_m + 1)`` outputs.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

SpecialistOutput = tuple[Tensor, Tensor]
"""``(example_index (n_m,), probs (n_m, L_m + 1))`` of one specialist."""

PROB_ATOL = 1e-4
"""Largest accepted ``|sum(row) - 1|`` of an input probability row."""

_MAX_ROWS_IN_MESSAGE = 10


@dataclass(frozen=True)
class GroupMembership:
    """Which classes each specialist covers, in the order of its output head.

    ``groups[m]`` lists the class ids of specialist ``m`` (its head's outputs, before the
    dustbin). Groups may overlap; a group may not be empty, repeat a class, or hold every class
    (its dustbin would then be an empty event).
    """

    num_classes: int
    groups: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        num_classes = operator.index(self.num_classes)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        groups = tuple(tuple(operator.index(c) for c in group) for group in self.groups)
        for m, group in enumerate(groups):
            _check_group(m, group, num_classes)
        object.__setattr__(self, "num_classes", num_classes)
        object.__setattr__(self, "groups", groups)

    @classmethod
    def from_groups(cls, groups: Sequence[Sequence[int]], num_classes: int) -> GroupMembership:
        """Validated membership from per-specialist class lists."""
        return cls(num_classes=num_classes, groups=tuple(tuple(g) for g in groups))

    @property
    def num_groups(self) -> int:
        """``S``, the number of specialists."""
        return len(self.groups)

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        """``(L_1, ..., L_S)``."""
        return tuple(len(g) for g in self.groups)

    @cached_property
    def _coo(self) -> tuple[Tensor, Tensor]:
        """CPU ``(group_id (nnz,), class_id (nnz,))`` of the membership matrix, row-major."""
        rows = [m for m, g in enumerate(self.groups) for _ in g]
        cols = [c for g in self.groups for c in g]
        return torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)

    @cached_property
    def _padded(self) -> Tensor:
        """CPU ``(S, max L_m)`` class ids in head order, ``-1`` after the end of a group."""
        width = max(self.sizes, default=0)
        out = torch.full((self.num_groups, width), -1, dtype=torch.long)
        for m, group in enumerate(self.groups):
            out[m, : len(group)] = torch.tensor(group, dtype=torch.long)
        return out

    def padded_groups(self, device: torch.device | str | None = None) -> Tensor:
        """``(S, max L_m)`` long: class ids of each group in head order, ``-1`` padding."""
        return self._padded.to(device)

    def dense(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """``(S, K)`` 0/1 membership matrix ``M`` (``M[m, j] = 1`` iff ``j`` in ``S_m``)."""
        rows, cols = self._coo
        out = torch.zeros(self.num_groups, self.num_classes, dtype=dtype, device=device)
        out[rows.to(out.device), cols.to(out.device)] = 1
        return out

    def sparse(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """``(S, K)`` sparse CSR membership matrix (column ids sorted within each row)."""
        crow = torch.zeros(self.num_groups + 1, dtype=torch.long)
        crow[1:] = torch.tensor(self.sizes, dtype=torch.long).cumsum(0)
        col = torch.cat([torch.tensor(sorted(g), dtype=torch.long) for g in self.groups]) if self.groups else torch.zeros(0, dtype=torch.long)
        values = torch.ones(col.numel(), dtype=dtype or torch.get_default_dtype())
        size = (self.num_groups, self.num_classes)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=True).to(device)

    def class_to_groups(self) -> list[list[int]]:
        """For every class ``j`` (``K`` entries), the sorted ids of the groups containing it."""
        out: list[list[int]] = [[] for _ in range(self.num_classes)]
        for m, group in enumerate(self.groups):
            for c in group:
                out[c].append(m)
        return out


def _check_group(m: int, group: tuple[int, ...], num_classes: int) -> None:
    if not group:
        raise ValueError(f"group {m} is empty")
    bad = [c for c in group if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"group {m} has class ids outside [0, {num_classes}): {bad[:_MAX_ROWS_IN_MESSAGE]}")
    if len(set(group)) != len(group):
        dups = sorted({c for c in group if group.count(c) > 1})
        raise ValueError(f"group {m} repeats class ids {dups[:_MAX_ROWS_IN_MESSAGE]}")
    if len(group) == num_classes:
        raise ValueError(f"group {m} holds all {num_classes} classes, so its dustbin is empty")


def active_specialists(p_general: Tensor, membership: GroupMembership, top_n: int = 1) -> Tensor:
    """``(B, K)`` generalist probabilities -> ``(B, S)`` bool: specialist ``m`` is active for an
    example iff ``S_m`` holds one of the generalist's ``top_n`` classes (ties: ``torch.topk``)."""
    check_general(p_general, membership)
    check_top_n(top_n, membership.num_classes)
    top = p_general.topk(top_n, dim=1).indices  # (B, n)
    class_in_group = membership.dense(p_general.device, torch.bool).T  # (K, S)
    return class_in_group[top].any(dim=1)  # (B, S)


def route(active: Tensor) -> list[Tensor]:
    """``(B, S)`` bool -> per specialist the sorted ``(n_m,)`` long ids of its active examples."""
    if active.dim() != 2 or active.dtype != torch.bool:
        raise ValueError(f"active must be a 2-D bool tensor (B, S), got {active.dtype} {tuple(active.shape)}")
    pairs = active.T.nonzero()  # (P, 2) [specialist, example], sorted by specialist
    counts = active.sum(dim=0).tolist()
    return list(torch.split(pairs[:, 1], counts))


def routed_from_dense(dense_probs: Sequence[Tensor], active: Tensor) -> list[SpecialistOutput]:
    """Per-specialist ``(B, L_m + 1)`` outputs -> routed pairs keeping only the active rows."""
    indices = route(active)
    if len(dense_probs) != len(indices):
        raise ValueError(f"got {len(dense_probs)} specialist outputs for {len(indices)} specialists")
    return [(idx, probs[idx.to(probs.device)]) for idx, probs in zip(indices, dense_probs, strict=True)]


# ----------------------------------------------------------------------------------- validation


def _rows_text(rows: Tensor) -> str:
    ids = rows.tolist()
    more = f" (+{len(ids) - _MAX_ROWS_IN_MESSAGE} more)" if len(ids) > _MAX_ROWS_IN_MESSAGE else ""
    return f"{ids[:_MAX_ROWS_IN_MESSAGE]}{more}"


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
