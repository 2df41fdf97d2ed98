"""Tables and orderings that describe confusable groups (no file I/O; callers save them)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from clustering._validation import check_cov, check_groups, check_num_classes

_BLOCK = 2048


def off_diagonal_mass(cov: np.ndarray | sp.csr_matrix) -> float:
    """Sum of |C_ij| over i != j of a (K, K) matrix (blockwise for dense input)."""
    if sp.issparse(cov):
        return float(abs(cov).sum() - np.abs(cov.diagonal()).sum())
    total = 0.0
    for start in range(0, cov.shape[0], _BLOCK):
        total += float(np.abs(cov[start : start + _BLOCK]).sum(dtype=np.float64))
    return total - float(np.abs(np.diag(cov)).sum(dtype=np.float64))


def confusion_mass_share(cov: Any, groups: Sequence[Any]) -> np.ndarray:
    """Share of the covariance's off-diagonal mass that lies inside each group.

    share_g = sum_{i != j, i, j in g} |C_ij| / sum_{i != j} |C_ij|. Each share is in [0, 1];
    for disjoint groups the shares sum to at most 1. A diagonal C gives all zeros.

    Args:
        cov: (K, K) dense or sparse class covariance.
        groups: sequence of G class-index arrays.

    Returns:
        (G,) float64 shares.
    """
    mat = check_cov(cov)
    grps = check_groups(groups, mat.shape[0])
    total = off_diagonal_mass(mat)
    shares = np.zeros(len(grps), dtype=np.float64)
    if total <= 0:
        return shares
    for gid, group in enumerate(grps):
        idx = np.unique(group)
        block = mat[idx][:, idx] if sp.issparse(mat) else mat[np.ix_(idx, idx)]
        shares[gid] = off_diagonal_mass(block) / total
    return np.clip(shares, 0.0, 1.0)


def group_table(
    cov: Any, groups: Sequence[Any], class_names: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """One row per group: group_id, size, class_indices, classes (names), mass_share.

    Args:
        cov: (K, K) class covariance.
        groups: G class-index arrays (e.g. ``ConfusableGroups.groups_``).
        class_names: K names; None uses the class indices as strings.

    Returns:
        List of G dicts with plain Python values (JSON-serialisable).
    """
    mat = check_cov(cov)
    k = mat.shape[0]
    if class_names is None:
        class_names = [str(c) for c in range(k)]
    if len(class_names) != k:
        raise ValueError(
            f"class_names has {len(class_names)} entries but cov has {k} classes; pass one name per class."
        )
    grps = check_groups(groups, k)
    shares = confusion_mass_share(mat, grps)
    return [
        {
            "group_id": gid,
            "size": int(group.size),
            "class_indices": [int(c) for c in group],
            "classes": [str(class_names[c]) for c in group],
            "mass_share": float(shares[gid]),
        }
        for gid, group in enumerate(grps)
    ]


def reorder_by_groups(groups: Sequence[Any], num_classes: int) -> np.ndarray:
    """(K,) permutation listing group 0's classes, then group 1's, ..., then unassigned ones.

    A class in several (overlapping) groups appears at its first group; unassigned classes
    follow in increasing order. ``cov[np.ix_(perm, perm)]`` puts groups on the diagonal.
    """
    k = check_num_classes(num_classes)
    grps = check_groups(groups, k)
    seen = np.zeros(k, dtype=bool)
    order = []
    for group in grps:
        fresh = np.unique(group)
        fresh = fresh[~seen[fresh]]
        seen[fresh] = True
        order.append(fresh)
    order.append(np.flatnonzero(~seen))
    return np.concatenate(order).astype(np.int64)


def group_segments(groups: Sequence[Any], num_classes: int) -> list[tuple[int, int]]:
    """(start, stop) positions of each group's first-seen classes in ``reorder_by_groups``."""
    grps = check_groups(groups, num_classes)
    seen = np.zeros(num_classes, dtype=bool)
    segments, pos = [], 0
    for group in grps:
        fresh = np.unique(group)
        fresh = fresh[~seen[fresh]]
        seen[fresh] = True
        segments.append((pos, pos + fresh.size))
        pos += fresh.size
    return segments
