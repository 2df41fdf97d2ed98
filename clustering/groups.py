"""``ConfusableGroups``: groups of classes the generalist confuses (DESIGN 2.1).

Clusters the normalised columns of the class covariance C = Cov_x[p^g(x)] of the
generalist's held-out predictions. Each resulting group gets one specialist.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator
from sklearn.metrics import adjusted_rand_score

from clustering import backends
from clustering._validation import (
    METHODS,
    NORMALIZATIONS,
    check_choice,
    check_cov,
    check_n_groups,
    check_positive_int,
)
from clustering.features import (
    affinity,
    default_svd_components,
    dense_embedding,
    normalized_descriptors,
    normalized_sparse,
    sparse_embedding,
)
from clustering.selection import active_classes, choose_n_groups

AUTO_FAISS_MIN_CLASSES = 2_000
_CENTROID_METHODS = ("kmeans", "minibatch_kmeans", "faiss")


class ConfusableGroups(BaseEstimator):
    """Find groups of confusable classes by clustering the normalised class covariance.

    Args:
        n_groups: number of clusters k; None chooses it with ``choose_n_groups`` (eigengap of
            the normalised affinity over 2 .. min(K // 2, 100)).
        method: "kmeans" | "minibatch_kmeans" | "spectral" | "agglomerative" | "faiss" |
            "auto" (spectral when K < 2,000, else faiss). "kmeans" is scikit-learn KMeans
            (k-means++, Lloyd) on the full (K, K) float64 normalised descriptors. "faiss"
            first projects the descriptors onto their top ``svd_components`` right singular
            vectors (randomized SVD with 1 power iteration, in cov's dtype) and runs faiss
            k-means (k-means++ seeding) in that d-dimensional space: a (K, d) problem instead
            of (K, K), e.g. K = 15,000, k = 50 -> d = 100.
        normalize: "correlation" (C_ij / sqrt(C_ii C_jj)) or "l2" (unit-norm columns).
        group_size: None for disjoint groups (the clusters); an int s for overlapping
            fixed-size groups: each of the k centroids takes its s nearest classes (methods
            without centroids use the clusters' mean descriptors). Distances are measured
            in the space the clusters were found in (the d-dim projection for "faiss" and
            sparse input), so a class's nearest centroid is its own cluster's.
        min_group_size: groups smaller than this are dropped (their classes become
            unassigned, i.e. handled by the generalist alone).
        random_state: seed for every random step.
        max_iter: Lloyd iterations (faiss runs exactly this many; sklearn at most this many).
        n_init: k-means restarts (best objective kept).
        svd_components: size d of the randomized-SVD embedding used for sparse input (any
            method) and for method "faiss"; default k + 16 for sparse and 2k for dense input,
            capped at K - 1 (keep it >= k: one dimension per group; see
            ``features.default_svd_components``).
        compute_stability: also compute ``stability_`` (mean pairwise ARI over seeds
            random_state, +1, +2); triples the fit time, so off by default.

    Attributes (after ``fit``):
        groups_: list of sorted int64 class-index arrays, largest group first.
        labels_: (K,) group id (index into ``groups_``) per class, -1 if in no group; for
            overlapping groups the group of the class's nearest centroid.
        cluster_labels_: (K,) raw cluster id per class before dropping (-1: zero variance).
        n_groups_: number of clusters k (given or chosen); ``len(groups_)`` groups survive.
        unassigned_: sorted class indices in no group (dropped groups, zero-variance classes,
            classes no overlapping group picked).
        dropped_groups_: class-index arrays of the groups dropped for being too small.
        zero_variance_classes_: classes with zero variance (never clusterable).
        method_, normalize_: the method actually used and the normalisation.
        n_iter_: Lloyd iterations run (k-means methods; None for spectral/agglomerative).
        n_components_: dimension d of the embedding the classes were clustered in ("faiss"
            and sparse input); None when the full normalised descriptors (or, for spectral,
            the affinity) were clustered.
        stability_: only with ``compute_stability=True``.
    """

    def __init__(
        self,
        n_groups: int | None = None,
        method: str = "auto",
        normalize: str = "correlation",
        group_size: int | None = None,
        min_group_size: int = 2,
        random_state: int = 0,
        max_iter: int = 100,
        n_init: int = 1,
        svd_components: int | None = None,
        compute_stability: bool = False,
    ) -> None:
        self.n_groups = n_groups
        self.method = method
        self.normalize = normalize
        self.group_size = group_size
        self.min_group_size = min_group_size
        self.random_state = random_state
        self.max_iter = max_iter
        self.n_init = n_init
        self.svd_components = svd_components
        self.compute_stability = compute_stability

    def fit(self, cov: Any, y: None = None) -> ConfusableGroups:
        """Cluster the classes of ``cov``, a dense (K, K) ndarray or scipy.sparse matrix.

        Sparse input is normalised sparsely and embedded with randomized TruncatedSVD before
        clustering (never densified). Dense input is clustered on its K-dim descriptors,
        except with method "faiss", which first projects them to ``n_components_`` dims.
        """
        self._check_params()
        mat = check_cov(cov)
        k = mat.shape[0]
        active = np.flatnonzero(active_classes(mat, self.normalize))
        if active.size < 2:
            raise ValueError(
                f"only {active.size} class has non-zero variance; at least 2 are needed to form groups."
            )
        sub = mat if active.size == k else _submatrix(mat, active)
        self.n_features_in_ = k
        self.normalize_ = self.normalize
        self.method_ = resolve_method(self.method, k)
        if self.n_groups is None:
            self.n_groups_ = choose_n_groups(
                sub, normalize=self.normalize, random_state=self.random_state
            )
        else:
            self.n_groups_ = check_n_groups(self.n_groups, active.size)
        if self.group_size is not None and self.group_size > active.size:
            raise ValueError(
                f"group_size={self.group_size} exceeds the {active.size} clusterable classes; pass a smaller group_size."
            )
        labels, groups, nearest = self._cluster(sub)
        self._set_groups(k, active, labels, groups, nearest)
        if self.compute_stability:
            self.stability_ = stability_score(
                mat,
                n_groups=self.n_groups_,
                method=self.method_,
                normalize=self.normalize,
                seeds=(self.random_state, self.random_state + 1, self.random_state + 2),
                max_iter=self.max_iter,
                n_init=self.n_init,
                svd_components=self.svd_components,
            )
        return self

    def summary(self) -> dict[str, Any]:
        """Plain dict of the fit's figures (for logging by the caller)."""
        sizes = [int(g.size) for g in self.groups_]
        return {
            "method": self.method_,
            "normalize": self.normalize_,
            "n_components": self.n_components_,
            "n_classes": int(self.n_features_in_),
            "n_groups": int(self.n_groups_),
            "n_groups_kept": len(self.groups_),
            "n_groups_dropped": len(self.dropped_groups_),
            "n_unassigned": int(self.unassigned_.size),
            "n_zero_variance": int(self.zero_variance_classes_.size),
            "overlapping": self.group_size is not None,
            "group_sizes": sizes,
            "stability": getattr(self, "stability_", None),
        }

    def _check_params(self) -> None:
        check_choice(self.method, "method", METHODS)
        check_choice(self.normalize, "normalize", NORMALIZATIONS)
        check_positive_int(self.min_group_size, "min_group_size")
        check_positive_int(self.max_iter, "max_iter")
        check_positive_int(self.n_init, "n_init")
        if self.svd_components is not None:
            check_positive_int(self.svd_components, "svd_components")
        if self.group_size is not None:
            check_positive_int(self.group_size, "group_size")
            if self.group_size < self.min_group_size:
                raise ValueError(
                    f"group_size={self.group_size} is below min_group_size={self.min_group_size}, so "
                    "every group would be dropped; raise group_size or lower min_group_size."
                )

    def _cluster(
        self, sub: np.ndarray | sp.csr_matrix
    ) -> tuple[np.ndarray, list[np.ndarray] | None, np.ndarray]:
        """Returns (cluster labels, overlapping groups or None, nearest-centroid cluster)."""
        n, rs = self.n_groups_, self.random_state
        need_x = self.method_ != "spectral" or self.group_size is not None
        self.n_components_ = None
        x = self._descriptors(sub) if need_x else None
        centroids, self.n_iter_ = None, None
        if self.method_ == "spectral":
            labels = backends.spectral(
                affinity(sub, self.normalize), n, random_state=rs, n_init=self.n_init
            )
        elif self.method_ == "agglomerative":
            labels = backends.agglomerative(x, n)
        else:
            fit = {"faiss": backends.faiss_kmeans, "kmeans": backends.sklearn_kmeans}.get(
                self.method_, backends.minibatch_kmeans
            )
            labels, centroids, self.n_iter_ = fit(
                x, n, random_state=rs, max_iter=self.max_iter, n_init=self.n_init
            )
        if self.group_size is None:
            return labels, None, labels
        if centroids is None:
            centroids = backends.cluster_means(x, labels, n)
        dist = backends.squared_distances(x, centroids)
        s = self.group_size
        members = np.argpartition(dist, s - 1, axis=0)[:s].T if s < dist.shape[0] else None
        groups = (
            [np.sort(m) for m in members] if members is not None else [np.arange(dist.shape[0])] * n
        )
        return labels, groups, np.argmin(dist, axis=1)

    def _descriptors(self, sub: np.ndarray | sp.csr_matrix) -> np.ndarray:
        """(K', d) descriptors of the active classes; sets ``n_components_``."""
        dim = self.svd_components or default_svd_components(
            self.n_groups_, sub.shape[0], sparse=sp.issparse(sub)
        )
        if sp.issparse(sub):
            x = sparse_embedding(normalized_sparse(sub, self.normalize), dim, self.random_state)
        elif self.method_ == "faiss":
            x = dense_embedding(sub, self.normalize, dim, self.random_state)
        else:
            return normalized_descriptors(sub, self.normalize, dtype=np.float64)
        self.n_components_ = int(x.shape[1])
        return x

    def _set_groups(
        self,
        k: int,
        active: np.ndarray,
        labels: np.ndarray,
        groups: list[np.ndarray] | None,
        nearest: np.ndarray,
    ) -> None:
        if groups is None:
            order = np.argsort(labels, kind="stable")
            bounds = np.flatnonzero(np.diff(labels[order])) + 1
            groups = np.split(order, bounds)
            cluster_ids = [int(labels[g[0]]) for g in groups]
        else:
            cluster_ids = list(range(len(groups)))
        candidates = [(active[g], cid) for g, cid in zip(groups, cluster_ids, strict=True)]
        keep, dropped, seen = [], [], {}
        for members, cid in candidates:
            key = members.tobytes()
            if members.size < self.min_group_size:
                dropped.append(members)
            elif key in seen:
                seen[key][1].append(cid)
            else:
                seen[key] = (members, [cid])
                keep.append(seen[key])
        keep.sort(key=lambda item: (-item[0].size, int(item[0][0])))
        cluster_to_group = np.full(self.n_groups_, -1, dtype=np.int64)
        for gid, (_, cids) in enumerate(keep):
            cluster_to_group[cids] = gid
        self.groups_ = [members for members, _ in keep]
        self.dropped_groups_ = dropped
        self.cluster_labels_ = np.full(k, -1, dtype=np.int64)
        self.cluster_labels_[active] = labels
        self.labels_ = np.full(k, -1, dtype=np.int64)
        self.labels_[active] = cluster_to_group[nearest]
        covered = np.zeros(k, dtype=bool)
        for members in self.groups_:
            covered[members] = True
        self.unassigned_ = np.flatnonzero(~covered)
        self.zero_variance_classes_ = np.setdiff1d(np.arange(k), active)


def resolve_method(method: str, num_classes: int) -> str:
    """The concrete method: "auto" becomes "spectral" when K < 2,000, else "faiss".

    Below 2,000 classes spectral clustering of the correlation affinity is cheap (dense
    eigendecomposition) and follows chains of confusion that k-means merges (on a real
    320-class glyph covariance it separates diacritic families such as A-grave / A-acute /
    A-ring, where k-means on raw columns gives one 89-class group); from 2,000 classes on,
    the projected faiss k-means (see ``ConfusableGroups``) scales to large K.
    """
    if method != "auto":
        return method
    return "faiss" if num_classes >= AUTO_FAISS_MIN_CLASSES else "spectral"


def _submatrix(mat: np.ndarray | sp.csr_matrix, idx: np.ndarray) -> np.ndarray | sp.csr_matrix:
    return mat[idx][:, idx] if sp.issparse(mat) else mat[np.ix_(idx, idx)]


def stability_score(
    cov: Any,
    *,
    n_groups: int | None,
    method: str = "kmeans",
    normalize: str = "correlation",
    seeds: Sequence[int] = (0, 1, 2),
    **params: Any,
) -> float:
    """Mean pairwise adjusted Rand index of the clusterings obtained with different seeds.

    Fits ``ConfusableGroups(n_groups, method, normalize, random_state=seed, **params)`` once
    per seed on the (K, K) ``cov`` and compares the raw cluster labels (``cluster_labels_``)
    of every pair of seeds. 1.0 means the grouping does not depend on the seed.

    Args:
        cov: (K, K) dense or sparse class covariance.
        n_groups: number of clusters; None chooses it once with ``choose_n_groups``.
        seeds: at least two distinct seeds.
        **params: other ``ConfusableGroups`` parameters (max_iter, n_init, svd_components).

    Returns:
        Mean ARI in [-1, 1] over the len(seeds) * (len(seeds) - 1) / 2 pairs.
    """
    seeds = list(seeds)
    if len(set(seeds)) < 2:
        raise ValueError(
            f"stability needs at least two distinct seeds, got {seeds}; pass e.g. seeds=(0, 1, 2)."
        )
    if n_groups is None:
        n_groups = choose_n_groups(cov, normalize=normalize)
    labelings = [
        ConfusableGroups(
            n_groups=n_groups, method=method, normalize=normalize, random_state=int(seed), **params
        )
        .fit(cov)
        .cluster_labels_
        for seed in seeds
    ]
    return float(np.mean([adjusted_rand_score(a, b) for a, b in combinations(labelings, 2)]))
