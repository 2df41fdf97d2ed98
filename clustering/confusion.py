"""Confusions on the holdout split: the affinities that group a strong generalist's classes, and
how much of its confusion a grouping keeps inside groups (DESIGN 2.1).

A strong generalist's prediction covariance is dominated by its diagonal, so its raw columns are
nearly orthogonal and clustering them finds little. The off-diagonal part carries the confusions:

* ``"confusion"``: the soft holdout confusion ``M[i, j] = sum over examples of class i of p_j(x)``
  (labels are available on the holdout split), symmetrised;
* ``"copred"``: the co-prediction ``E[p_i p_j]`` (no labels);
* ``"offdiag"``: the covariance with negative entries clipped (no labels).

Each has its diagonal removed and is degree-normalised, ``A_ij / sqrt(d_i d_j)`` with ``d`` the
row sums, so frequent or often-confused classes do not dominate (the normalised affinity of
spectral clustering).

A grouping is judged by the share of the off-diagonal soft confusion mass that falls inside
groups (:func:`captured_share`) against random groupings with the same group sizes
(:func:`random_share`): their ratio is 1 for a grouping no better than chance.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clustering._validation import check_num_classes, check_probs, to_numpy

AFFINITIES = ("confusion", "copred", "offdiag")

__all__ = ["AFFINITIES", "ConfusionAccumulator", "affinity_from", "captured_share", "group_shares",
           "grouping_quality", "normalised_affinity", "random_share"]


class ConfusionAccumulator:
    """Streaming soft confusion ``M (K, K)``: row ``i`` sums the probability vectors of the
    examples whose label is ``i`` (float64; memory O(K^2), independent of the examples seen)."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = check_num_classes(num_classes)
        self._mass = np.zeros((self.num_classes, self.num_classes), dtype=np.float64)
        self.count = 0

    def update(self, probs: object, labels: object) -> None:
        """Add a batch: ``probs (B, K)`` probabilities, ``labels (B,)`` ints in [0, K)."""
        p = check_probs(probs, self.num_classes)
        y = to_numpy(labels, "labels").astype(np.int64).reshape(-1)
        if y.shape[0] != p.shape[0]:
            raise ValueError(f"labels ({y.shape[0]}) and probs ({p.shape[0]}) must have one row per example")
        if y.size and (y.min() < 0 or y.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got {y.min()}..{y.max()}")
        np.add.at(self._mass, y, p.astype(np.float64))
        self.count += int(y.size)

    def confusion(self) -> np.ndarray:
        """``(K, K)`` float64 soft confusion, diagonal included (``M[i].sum()`` = examples of i)."""
        if self.count == 0:
            raise ValueError("no holdout example was seen; the holdout split is empty")
        return self._mass.copy()


def normalised_affinity(mat: np.ndarray) -> np.ndarray:
    """Symmetric, non-negative, zero-diagonal ``(K, K)`` degree-normalised affinity of ``mat``."""
    a = np.clip(np.asarray(mat, dtype=np.float64), 0.0, None)
    a = a + a.T
    np.fill_diagonal(a, 0.0)
    degree = np.sqrt(a.sum(axis=1))
    degree[degree == 0] = 1.0
    return a / degree[:, None] / degree[None, :]


def affinity_from(kind: str, *, confusion: np.ndarray | None = None, cov: np.ndarray | None = None,
                  mean: np.ndarray | None = None) -> np.ndarray:
    """The ``(K, K)`` affinity ``kind`` (see the module docstring) from the holdout soft
    ``confusion``, or the prediction covariance ``cov`` and mean probability ``mean``."""
    if kind == "confusion":
        if confusion is None:
            raise ValueError("the confusion affinity needs the holdout confusion (labels)")
        return normalised_affinity(confusion)
    if cov is None:
        raise ValueError(f"the {kind} affinity needs the prediction covariance")
    if kind == "copred":
        if mean is None:
            raise ValueError("the copred affinity needs the mean prediction")
        return normalised_affinity(cov + np.outer(mean, mean))
    if kind == "offdiag":
        return normalised_affinity(cov)
    raise ValueError(f"unknown affinity {kind!r}; use one of {AFFINITIES}")


def _inside(num_classes: int, groups: Sequence[Sequence[int]]) -> np.ndarray:
    mask = np.zeros((num_classes, num_classes), dtype=bool)
    for group in groups:
        g = np.asarray(group, dtype=np.int64)
        mask[np.ix_(g, g)] = True
    np.fill_diagonal(mask, False)
    return mask


def captured_share(confusion: np.ndarray, groups: Sequence[Sequence[int]]) -> float:
    """Share of the off-diagonal soft confusion mass whose (true, predicted) classes share a group
    (NaN when the generalist confuses nothing)."""
    m = np.asarray(confusion, dtype=np.float64).copy()
    np.fill_diagonal(m, 0.0)
    total = m.sum()
    if total <= 0:
        return float("nan")
    return float(m[_inside(m.shape[0], groups)].sum() / total)


def group_shares(confusion: np.ndarray, groups: Sequence[Sequence[int]]) -> np.ndarray:
    """``(G,)``: :func:`captured_share` of each group alone, the off-diagonal total computed once
    and only each group's block read (NaN when the generalist confuses nothing)."""
    m = np.asarray(confusion, dtype=np.float64)
    total = float(m.sum() - np.trace(m))
    if total <= 0:
        return np.full(len(groups), np.nan)
    blocks = (m[np.ix_(idx, idx)] for idx in (np.unique(np.asarray(g, dtype=np.int64)) for g in groups))
    return np.array([(block.sum() - np.trace(block)) / total for block in blocks], dtype=np.float64)


def random_share(confusion: np.ndarray, groups: Sequence[Sequence[int]], *, seeds: int = 20) -> float:
    """Mean :func:`captured_share` of random groupings with the same group sizes: disjoint when
    the groups are (a random partition), else each group an independent random draw."""
    k = confusion.shape[0]
    sizes = [len(g) for g in groups]
    disjoint = sum(sizes) <= k and len({int(c) for g in groups for c in g}) == sum(sizes)
    shares = []
    for seed in range(seeds):
        rng = np.random.default_rng([seed, k, len(sizes)])
        if disjoint:
            cuts = np.cumsum(sizes)[:-1]
            drawn = np.split(rng.permutation(k)[:sum(sizes)], cuts)
        else:
            drawn = [rng.choice(k, size=s, replace=False) for s in sizes]
        shares.append(captured_share(confusion, drawn))
    return float(np.mean(shares))


def grouping_quality(confusion: np.ndarray, groups: Sequence[Sequence[int]], *, seeds: int = 20) -> dict:
    """``captured_share``, ``random_share`` (same sizes, mean over ``seeds``) and their ``ratio``."""
    captured = captured_share(confusion, groups)
    chance = random_share(confusion, groups, seeds=seeds)
    ratio = captured / chance if chance > 0 else float("nan")
    return {"captured_share": captured, "random_share": chance, "ratio_to_random": ratio}
