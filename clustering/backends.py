"""Clustering back-ends on (n, d) class descriptors (rows are classes).

k-means back-ends return (labels (n,), centroids (n_clusters, d), iterations run); spectral
(which takes a non-negative (n, n) affinity instead) and agglomerative return labels only.
Back-ends are deterministic given ``random_state``.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
from sklearn.cluster import AgglomerativeClustering, KMeans, MiniBatchKMeans, SpectralClustering

_AGGLOMERATIVE_MAX = 20_000
_FAISS_CHUNK = 10
_FAISS_SMALL_WORK = 2e8  # n * d * k multiply-adds per Lloyd iteration


def kmeans_plusplus_init(
    x: np.ndarray, n_clusters: int, random_state: int, sample_size: int | None = None
) -> np.ndarray:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007, 2 + ln k local trials per step).

    Vectorised float32/float64 GEMMs; seeds on a random sample of ``sample_size`` rows
    (default max(2,000, 20 * n_clusters)) so its cost does not grow with n.

    Args:
        x: (n, d) points.
        n_clusters: k <= n.

    Returns:
        (k, d) initial centroids (rows of x), same dtype as x.
    """
    rng = np.random.default_rng(random_state)
    n = x.shape[0]
    size = sample_size or max(2_000, 20 * n_clusters)
    pts = x[np.sort(rng.choice(n, size, replace=False))] if size < n else x
    m = pts.shape[0]
    trials = 2 + int(np.log(n_clusters))
    sq = np.einsum("ij,ij->i", pts, pts, dtype=np.float64)
    chosen = [int(rng.integers(m))]
    best_d2 = np.maximum(sq + sq[chosen[0]] - 2.0 * (pts @ pts[chosen[0]]), 0.0)
    for _ in range(1, n_clusters):
        total = best_d2.sum()
        if total <= 0:  # fewer distinct points than clusters: fall back to random rows
            cand = rng.integers(m, size=trials)
        else:
            cand = np.searchsorted(np.cumsum(best_d2), rng.random(trials) * total)
            cand = np.minimum(cand, m - 1)
        d2 = np.maximum(sq[None, :] + sq[cand][:, None] - 2.0 * (pts @ pts[cand].T).T, 0.0)
        d2 = np.minimum(best_d2[None, :], d2)
        pick = int(np.argmin(d2.sum(axis=1)))
        chosen.append(int(cand[pick]))
        best_d2 = d2[pick]
    return np.ascontiguousarray(pts[chosen])


def faiss_kmeans(
    x: np.ndarray, n_clusters: int, *, random_state: int, max_iter: int, n_init: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """faiss k-means (CPU, float32) seeded with ``kmeans_plusplus_init``; best of ``n_init``.

    Lloyd iterations run on all n points (no subsampling) in chunks of 10, stopping at
    convergence (recent faiss stops a chunk early once the objective stops improving; with
    older faiss a chunk that leaves every assignment unchanged ends the run) or after
    ``max_iter`` iterations.

    Returns:
        labels (n,), centroids (n_clusters, d) float32, iterations run (best restart).
    """
    import faiss

    x32 = np.ascontiguousarray(x, dtype=np.float32)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(faiss_threads(x32.shape[0], x32.shape[1], n_clusters))
    best = None
    try:
        for restart in range(n_init):
            seed = random_state + restart
            init = kmeans_plusplus_init(x32, n_clusters, seed)
            objective, labels, centroids, n_iter = faiss_lloyd(x32, init, seed, max_iter)
            if best is None or objective < best[0]:
                best = (objective, labels, centroids, n_iter)
    finally:
        faiss.omp_set_num_threads(threads)
    return best[1], best[2], best[3]


def faiss_threads(n: int, d: int, n_clusters: int) -> int:
    """OpenMP threads ``faiss_kmeans`` uses for (n, d) points and k clusters.

    1 below 2e8 multiply-adds (n * d * k) per Lloyd iteration, where OpenMP start-up and
    barrier cost dominates (10x slower on 2 busy cores); faiss's maximum otherwise.
    """
    import faiss

    return 1 if n * d * n_clusters < _FAISS_SMALL_WORK else faiss.omp_get_max_threads()


def faiss_lloyd(
    x32: np.ndarray, centroids: np.ndarray, seed: int, max_iter: int
) -> tuple[float, np.ndarray, np.ndarray, int]:
    """faiss Lloyd iterations from given (k, d) centroids on (n, d) float32 x.

    Returns (sum of squared distances, labels (n,), centroids (k, d), iterations run).
    """
    import faiss

    n, d = x32.shape
    k = centroids.shape[0]
    labels, budget, n_iter = None, max_iter, 0
    while budget > 0:
        step = min(_FAISS_CHUNK, budget)
        km = faiss.Kmeans(
            d,
            k,
            niter=step,
            seed=seed,
            max_points_per_centroid=n // k + 1,
            min_points_per_centroid=1,
            verbose=False,
        )
        km.train(x32, init_centroids=centroids)
        centroids = km.centroids
        dist, new_labels = km.assign(x32)
        budget -= step
        ran = len(km.obj) if km.obj is not None else step
        n_iter += ran
        converged = ran < step or (labels is not None and np.array_equal(new_labels, labels))
        labels = new_labels
        if converged:
            break
    return float(dist.sum()), labels.astype(np.int64), centroids, n_iter


def sklearn_kmeans(
    x: np.ndarray, n_clusters: int, *, random_state: int, max_iter: int, n_init: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """sklearn KMeans (k-means++ init, Lloyd) on float64 descriptors."""
    km = KMeans(
        n_clusters, init="k-means++", n_init=n_init, max_iter=max_iter, random_state=random_state
    )
    km.fit(np.asarray(x, dtype=np.float64))
    return km.labels_.astype(np.int64), km.cluster_centers_, int(km.n_iter_)


def minibatch_kmeans(
    x: np.ndarray, n_clusters: int, *, random_state: int, max_iter: int, n_init: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """sklearn MiniBatchKMeans (k-means++ init on a sample, batches of 1,024 rows)."""
    km = MiniBatchKMeans(
        n_clusters,
        init="k-means++",
        n_init=n_init,
        max_iter=max_iter,
        batch_size=1024,
        random_state=random_state,
    )
    km.fit(np.asarray(x, dtype=np.float64))
    return km.labels_.astype(np.int64), km.cluster_centers_, int(km.n_iter_)


def spectral(
    affinity: np.ndarray | sp.csr_matrix, n_clusters: int, *, random_state: int, n_init: int
) -> np.ndarray:
    """sklearn SpectralClustering on a precomputed non-negative affinity; (n,) labels."""
    model = SpectralClustering(
        n_clusters,
        affinity="precomputed",
        random_state=random_state,
        n_init=max(n_init, 10),
        assign_labels="kmeans",
    )
    with warnings.catch_warnings():
        # A block-diagonal affinity (well-separated groups) is the ideal case, not a problem.
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        return model.fit_predict(affinity).astype(np.int64)


def agglomerative(x: np.ndarray, n_clusters: int) -> np.ndarray:
    """sklearn AgglomerativeClustering (Ward linkage); (n,) labels. O(n^2) memory."""
    if x.shape[0] > _AGGLOMERATIVE_MAX:
        raise ValueError(
            f"method='agglomerative' needs O(K^2) memory and is limited to K <= "
            f"{_AGGLOMERATIVE_MAX} classes (got {x.shape[0]}); use method='faiss' or "
            "'minibatch_kmeans' for large K."
        )
    model = AgglomerativeClustering(n_clusters=n_clusters, linkage="ward")
    return model.fit_predict(np.asarray(x, dtype=np.float64)).astype(np.int64)


def cluster_means(x: np.ndarray, labels: np.ndarray, n_clusters: int) -> np.ndarray:
    """(n_clusters, d) mean descriptor of each cluster (zeros for empty clusters)."""
    onehot = sp.csr_matrix(
        (np.ones(labels.size), (labels, np.arange(labels.size))), shape=(n_clusters, labels.size)
    )
    counts = np.maximum(np.asarray(onehot.sum(axis=1)).ravel(), 1.0)
    return np.asarray(onehot @ x, dtype=np.float64) / counts[:, None]


def squared_distances(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(n, n_clusters) squared Euclidean distances between rows of x and centroids."""
    c = np.asarray(centroids, dtype=x.dtype)
    x_sq = np.einsum("ij,ij->i", x, x, dtype=np.float64)
    c_sq = np.einsum("ij,ij->i", c, c, dtype=np.float64)
    return np.maximum(x_sq[:, None] - 2.0 * (x @ c.T) + c_sq[None, :], 0.0)
