"""Confusable groups from a confusion affinity, with the number of groups chosen on held-out data.

:class:`AffinityGroups` follows scikit-learn's estimator contract. ``fit(confusion)`` takes the
holdout soft confusion ``M (K, K)`` (:class:`clustering.confusion.ConfusionAccumulator`) split
into two halves of the holdout examples, ``M = M_a + M_b``:

1. **How many groups**: for each candidate k, spectral clustering of the affinity of one half
   is scored on the other half by its *excess captured confusion*: the share of the other
   half's off-diagonal confusion mass inside groups minus what random groups of the same sizes
   capture (a modularity on held-out confusions); both directions are averaged and the best k
   is kept. Few large groups capture a lot by chance, many small ones miss confusions; the
   excess peaks where the confusion structure is.
2. **Which groups**: spectral clustering of the whole holdout's affinity into k groups; when k
   was chosen here (not given), a group that does not capture ``min_ratio`` (2) times the chance
   share of confusion on data its clustering did not see (its classes are confused with each
   other hardly more than with random classes: *unrelated classes*) is dissolved, its classes left to the generalist; if no group survives, the single most
   confused pair is kept. Groups smaller than ``min_group_size`` are always dissolved.
3. **Overlap** (``overlap`` > 0): a class outside a group joins it when at least that share of
   its own confusion mass is with the group's classes (at most ``max_extra`` of the group's
   size), so boundary classes are covered by several specialists, as in the paper's Table 4.

Attributes after ``fit``: ``groups_`` (sorted int64 arrays, largest first), ``n_groups_`` (k),
``scores_`` (candidate k -> held-out excess), ``unassigned_``, ``dissolved_`` (groups dropped as
unrelated), ``labels_`` ((K,) the disjoint cluster of each class after dissolving, -1 if none).
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator

from clustering import backends
from clustering.confusion import captured_share, normalised_affinity, random_share

__all__ = ["AffinityGroups", "candidate_group_counts"]


def candidate_group_counts(num_classes: int) -> list[int]:
    """k = 2, 3, 4, 6, 8, 12, 16, ... up to K // 2 (groups of two classes on average)."""
    out, k = [], 2
    while k <= num_classes // 2:
        out.append(k)
        k = k + 1 if k < 4 else int(round(k * 1.5 / 2) * 2)
    return out or [1]


def _excess(confusion: np.ndarray, groups: list[np.ndarray], seeds: int) -> float:
    captured = captured_share(confusion, groups)
    return 0.0 if np.isnan(captured) else captured - random_share(confusion, groups, seeds=seeds)


def _held_out_ratio(group: np.ndarray, other_clusters: list[np.ndarray], held_out: np.ndarray,
                    seeds: int) -> float:
    """Captured / chance share of ``held_out`` confusion for the cluster of ``other_clusters``
    (found without ``held_out``) closest to ``group`` (Jaccard)."""
    members = set(group.tolist())
    match = max(other_clusters, key=lambda c: len(members & set(c.tolist())) / len(members | set(c.tolist())))
    if match.size < 2:
        return 0.0
    captured = captured_share(held_out, [match])
    chance = random_share(held_out, [match], seeds=seeds)
    return 0.0 if np.isnan(captured) or chance <= 0 else captured / chance


def _clusters(affinity: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    if k <= 1:
        return [np.arange(affinity.shape[0])]
    labels = backends.spectral(affinity + 1e-12, k, random_state=seed, n_init=10)
    return [np.flatnonzero(labels == c) for c in range(k) if (labels == c).any()]


class AffinityGroups(BaseEstimator):
    """Groups of confusable classes from holdout confusions (see the module docstring).

    Args:
        n_groups: k; None chooses it on held-out confusions.
        overlap: share of a class's confusion mass with a group above which it joins the group
            (0 = disjoint groups).
        max_extra: most classes added to a group by overlap, as a fraction of its size.
        min_group_size: smaller groups are dissolved.
        min_ratio: a group is kept only if it captures at least this multiple of the chance share of
            held-out confusion (when the number of groups is chosen here).
        random_state: seed of the spectral clustering.
        seeds: random groupings averaged for the chance level.
    """

    def __init__(self, n_groups: int | None = None, overlap: float = 0.0, max_extra: float = 0.5,
                 min_group_size: int = 2, min_ratio: float = 2.0, random_state: int = 0,
                 seeds: int = 10) -> None:
        self.n_groups = n_groups
        self.overlap = overlap
        self.max_extra = max_extra
        self.min_group_size = min_group_size
        self.min_ratio = min_ratio
        self.random_state = random_state
        self.seeds = seeds

    def fit(self, confusion_a: np.ndarray, confusion_b: np.ndarray, affinity_a: np.ndarray | None = None,
            affinity_b: np.ndarray | None = None) -> AffinityGroups:
        """Fit on the soft confusions of two disjoint halves of the holdout examples.

        ``affinity_a`` / ``affinity_b``: what is clustered for each half (e.g. the co-prediction
        ``E[p p^T]`` of that half; normalised here); default the confusions themselves. The
        number of groups and the dissolving are always judged on the confusions."""
        a, b = np.asarray(confusion_a, np.float64), np.asarray(confusion_b, np.float64)
        if a.shape != b.shape or a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 2:
            raise ValueError(f"need two (K, K) confusions of the same K >= 2, got {a.shape} and {b.shape}")
        raw_a = a if affinity_a is None else np.asarray(affinity_a, np.float64)
        raw_b = b if affinity_b is None else np.asarray(affinity_b, np.float64)
        k_classes = a.shape[0]
        self.scores_ = ({} if self.n_groups is not None
                        else self._score_candidates(a, b, normalised_affinity(raw_a), normalised_affinity(raw_b)))
        self.n_groups_ = self.n_groups or max(self.scores_, key=self.scores_.get)
        clusters = _clusters(normalised_affinity(raw_a + raw_b), min(self.n_groups_, k_classes),
                             self.random_state)
        kept, self.dissolved_ = (self._keep_related(clusters, a, b) if self.n_groups is None
                                 else ([g for g in clusters if g.size >= self.min_group_size],
                                       [g for g in clusters if g.size < self.min_group_size]))
        self.labels_ = np.full(k_classes, -1, dtype=np.int64)
        for gid, group in enumerate(kept):
            self.labels_[group] = gid
        groups = self._expand(kept, a + b) if self.overlap > 0 else kept
        self.groups_ = sorted((np.sort(g) for g in groups), key=lambda g: (-g.size, int(g[0])))
        covered = np.zeros(k_classes, dtype=bool)
        for group in self.groups_:
            covered[group] = True
        self.unassigned_ = np.flatnonzero(~covered)
        return self

    def _score_candidates(self, a: np.ndarray, b: np.ndarray, aff_a: np.ndarray,
                          aff_b: np.ndarray) -> dict[int, float]:
        scores = {}
        for k in candidate_group_counts(a.shape[0]):
            forward = _excess(b, _clusters(aff_a, k, self.random_state), self.seeds)
            backward = _excess(a, _clusters(aff_b, k, self.random_state), self.seeds)
            scores[k] = (forward + backward) / 2
        return scores

    def _keep_related(self, clusters: list[np.ndarray], a: np.ndarray,
                      b: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The clusters whose classes are confused with each other well above chance on data the
        clustering did not see: each cluster is matched to its closest cluster of either half
        alone, which must capture at least ``min_ratio`` times the chance share of the other
        half's confusion."""
        k = min(self.n_groups_, a.shape[0])
        from_a = _clusters(normalised_affinity(a), k, self.random_state)
        from_b = _clusters(normalised_affinity(b), k, self.random_state)
        kept, dissolved = [], []
        for group in clusters:
            related = (group.size >= self.min_group_size
                       and _held_out_ratio(group, from_a, b, self.seeds) >= self.min_ratio
                       and _held_out_ratio(group, from_b, a, self.seeds) >= self.min_ratio)
            (kept if related else dissolved).append(group)
        if not kept:
            kept = [self._most_confused_pair(a + b)]
        return kept, dissolved

    @staticmethod
    def _most_confused_pair(confusion: np.ndarray) -> np.ndarray:
        sym = confusion + confusion.T
        np.fill_diagonal(sym, -np.inf)
        i, j = np.unravel_index(int(np.argmax(sym)), sym.shape)
        return np.array(sorted((int(i), int(j))), dtype=np.int64)

    def _expand(self, groups: list[np.ndarray], confusion: np.ndarray) -> list[np.ndarray]:
        sym = confusion + confusion.T
        np.fill_diagonal(sym, 0.0)
        own = sym.sum(axis=1)
        own[own == 0] = 1.0
        out = []
        for group in groups:
            share = sym[:, group].sum(axis=1) / own  # (K,) share of each class's confusion with the group
            share[group] = -1.0
            extra = np.flatnonzero(share >= self.overlap)
            extra = extra[np.argsort(-share[extra])][: int(np.floor(self.max_extra * group.size)) or 1]
            out.append(np.concatenate([group, extra]).astype(np.int64))
        return out
