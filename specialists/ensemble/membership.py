"""Which classes each specialist covers (:class:`GroupMembership`), and the routed form of the
specialists' outputs that every solver takes.

Notation used throughout :mod:`specialists.ensemble`: ``B`` examples, ``K`` classes, ``S``
specialists (groups), ``S_m`` the ordered class ids of group ``m``, ``L_m = |S_m|``.

Specialist outputs are *routed*: each specialist only runs on the examples that activate it, so
``specialist_probs`` is a sequence of length ``S`` whose entry ``m`` is a pair
``(example_index, probs)``:

* ``example_index`` -- ``(n_m,)`` integer ids of the examples (rows of ``p_general``) that
  specialist ``m`` was run on; unique, in ``[0, B)``, any order;
* ``probs`` -- ``(n_m, L_m + 1)`` the specialist's distribution for those examples: its group's
  classes in ``membership.groups[m]`` order, then the dustbin.

Every example for which specialist ``m`` is active must have a row; rows for examples where it
is not active are allowed and ignored by the solvers. :func:`specialists.ensemble.routing.route`
gives the indices to run each specialist on.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

SpecialistOutput = tuple[Tensor, Tensor]
"""``(example_index (n_m,), probs (n_m, L_m + 1))`` of one specialist."""

MAX_IDS_IN_MESSAGE = 10
"""Error messages list at most this many offending ids."""


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


def _check_group(m: int, group: tuple[int, ...], num_classes: int) -> None:
    if not group:
        raise ValueError(f"group {m} is empty")
    bad = [c for c in group if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"group {m} has class ids outside [0, {num_classes}): {bad[:MAX_IDS_IN_MESSAGE]}")
    if len(set(group)) != len(group):
        dups = sorted({c for c in group if group.count(c) > 1})
        raise ValueError(f"group {m} repeats class ids {dups[:MAX_IDS_IN_MESSAGE]}")
    if len(group) == num_classes:
        raise ValueError(f"group {m} holds all {num_classes} classes, so its dustbin is empty")
