"""method="faiss" clusters a randomized-SVD projection of the descriptors (``n_components_``)."""

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from clustering import ConfusableGroups, planted_covariance
from clustering.features import dense_embedding, normalized_descriptors


@pytest.fixture(scope="module")
def moderate_planted() -> tuple[np.ndarray, np.ndarray]:
    """(3000, 3000) float32 covariance with 30 planted groups of 100 (noise 0.5)."""
    return planted_covariance(3_000, 30, noise=0.5, seed=1, dtype=np.float32)


def _pairwise(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    sq = np.einsum("ij,ij->i", x, x)
    return sq[:, None] + sq[None, :] - 2.0 * x @ x.T


@pytest.mark.parametrize("normalize", ["correlation", "l2"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_embedding_preserves_distances_of_low_rank_descriptors(normalize, dtype) -> None:
    # rank-8 covariance: its normalised descriptors span 8 dims, so a 12-dim projection onto
    # the top right singular vectors keeps every pairwise distance.
    rng = np.random.default_rng(0)
    factors = rng.standard_normal((200, 8)) * rng.lognormal(size=(200, 1))
    cov = (factors @ factors.T).astype(dtype)
    emb = dense_embedding(cov, normalize, n_components=12, random_state=0)
    assert emb.shape == (200, 12) and emb.dtype == np.float32
    exact = _pairwise(normalized_descriptors(cov, normalize))
    scale = np.abs(exact).max()
    assert np.abs(_pairwise(emb) - exact).max() <= 1e-4 * scale


def test_faiss_projection_recovers_planted_groups(moderate_planted) -> None:
    cov, truth = moderate_planted
    est = ConfusableGroups(n_groups=30, method="auto", random_state=0).fit(cov)
    assert est.method_ == "faiss" and est.n_components_ == 2 * 30
    assert adjusted_rand_score(truth, est.labels_) >= 0.9
    assert len(est.groups_) == 30 and est.unassigned_.size == 0
    assert est.summary()["n_components"] == 60
    small = ConfusableGroups(n_groups=30, method="faiss", svd_components=24).fit(cov)
    assert small.n_components_ == 24
    assert adjusted_rand_score(truth, small.labels_) >= 0.9


def test_faiss_projection_overlapping_groups_have_group_size(moderate_planted) -> None:
    cov, truth = moderate_planted
    est = ConfusableGroups(n_groups=30, method="faiss", group_size=120).fit(cov)
    assert est.n_components_ == 60 and len(est.groups_) == 30
    assert all(g.size == 120 and np.unique(g).size == 120 for g in est.groups_)
    assert np.bincount(np.concatenate(est.groups_)).max() >= 2  # 3,600 slots, 3,000 classes
    assert adjusted_rand_score(truth, est.labels_) >= 0.9  # labels_: nearest centroid
    # nearest centroid in the projected space is the class's own cluster's centroid
    disjoint = ConfusableGroups(n_groups=30, method="faiss").fit(cov)
    assert adjusted_rand_score(disjoint.cluster_labels_, est.labels_) == 1.0
    contained = [
        any(np.isin(np.flatnonzero(truth == p), g).all() for g in est.groups_) for p in range(30)
    ]
    assert np.mean(contained) >= 0.9


def test_kmeans_is_plain_sklearn_on_full_descriptors(easy_planted) -> None:
    cov, _ = easy_planted
    est = ConfusableGroups(n_groups=6, method="kmeans", random_state=3).fit(cov)
    assert est.n_components_ is None
    x = normalized_descriptors(cov, "correlation")  # (120, 120) float64
    ref = KMeans(6, init="k-means++", n_init=1, max_iter=100, random_state=3).fit(x)
    assert np.array_equal(est.cluster_labels_, ref.labels_)
    assert est.n_iter_ == ref.n_iter_
