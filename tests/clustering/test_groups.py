"""ConfusableGroups on planted covariances: recovery, overlap, dropping, selection, stability."""

import tracemalloc

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.metrics import adjusted_rand_score

from clustering import (
    ConfusableGroups,
    SparseCoPredictionAccumulator,
    choose_n_groups,
    covariance_from_labels,
    planted_labels,
    simulate_topk_predictions,
    stability_score,
)

METHODS = ["kmeans", "minibatch_kmeans", "spectral", "agglomerative", "faiss"]


def test_estimator_contract() -> None:
    est = ConfusableGroups(n_groups=4, method="faiss", group_size=10, random_state=7)
    params = est.get_params()
    assert params["n_groups"] == 4 and params["method"] == "faiss" and params["group_size"] == 10
    assert params["normalize"] == "correlation" and params["min_group_size"] == 2
    twin = clone(est)
    assert twin is not est and twin.get_params() == params
    assert twin.set_params(n_groups=3) is twin and twin.n_groups == 3
    assert not hasattr(twin, "groups_")  # __init__ only stores parameters


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("normalize", ["correlation", "l2"])
def test_each_method_recovers_planted_groups(easy_planted, method: str, normalize: str) -> None:
    cov, truth = easy_planted
    est = ConfusableGroups(n_groups=6, method=method, normalize=normalize, random_state=0)
    assert est.fit(cov) is est
    assert adjusted_rand_score(truth, est.labels_) >= 0.9
    assert est.method_ == method and est.normalize_ == normalize and est.n_groups_ == 6
    assert len(est.groups_) == 6 and est.unassigned_.size == 0
    assert sorted(np.concatenate(est.groups_).tolist()) == list(range(120))
    assert all(np.array_equal(g, np.sort(g)) for g in est.groups_)
    for gid, group in enumerate(est.groups_):
        assert (est.labels_[group] == gid).all()


def test_softmax_covariance_recovered(easy_softmax) -> None:
    cov, truth = easy_softmax
    for method in ("spectral", "agglomerative", "kmeans"):
        est = ConfusableGroups(n_groups=5, method=method).fit(cov)
        assert adjusted_rand_score(truth, est.labels_) >= 0.9, method


def test_auto_method_threshold(easy_planted) -> None:
    cov, truth = easy_planted
    est = ConfusableGroups(n_groups=6).fit(cov)
    assert est.method_ == "spectral" and est.n_components_ is None
    assert adjusted_rand_score(truth, est.labels_) >= 0.9
    from clustering import resolve_method

    assert resolve_method("auto", 2_000) == "faiss"
    assert resolve_method("auto", 1_999) == "spectral"
    assert resolve_method("spectral", 50_000) == "spectral"
    assert resolve_method("kmeans", 50_000) == "kmeans"


@pytest.mark.parametrize("method", ["faiss", "agglomerative"])
def test_overlapping_groups_have_fixed_size_and_overlap(easy_planted, method: str) -> None:
    cov, truth = easy_planted
    est = ConfusableGroups(n_groups=6, method=method, group_size=25).fit(cov)
    assert len(est.groups_) == 6
    assert all(g.size == 25 and np.unique(g).size == 25 for g in est.groups_)
    counts = np.bincount(np.concatenate(est.groups_), minlength=120)
    assert counts.max() >= 2  # 6 x 25 = 150 slots for 120 classes: groups overlap
    assert counts.sum() == 150
    for planted in range(6):  # every planted group sits inside one overlapping group
        members = np.flatnonzero(truth == planted)
        assert any(np.isin(members, g).all() for g in est.groups_)
    assert adjusted_rand_score(truth, est.labels_) >= 0.9  # labels_: nearest centroid


@pytest.mark.parametrize("method", ["agglomerative", "kmeans", "spectral"])
def test_small_groups_dropped_and_reported(method: str) -> None:
    # 3 planted groups of 12 and 3 classes the generalist never confuses with anything.
    truth = np.repeat([0, 1, 2, 3, 4, 5], [12, 12, 12, 1, 1, 1])
    cov = covariance_from_labels(truth, noise=0.3, seed=1)
    est = ConfusableGroups(n_groups=6, method=method).fit(cov)
    loners = [36, 37, 38]
    assert [g.size for g in est.groups_] == [12, 12, 12]
    assert adjusted_rand_score(truth[:36], est.labels_[:36]) == 1.0
    assert sorted(np.concatenate(est.dropped_groups_).tolist()) == loners
    assert est.unassigned_.tolist() == loners and (est.labels_[loners] == -1).all()
    summary = est.summary()
    assert summary["n_groups_dropped"] == 3 and summary["n_unassigned"] == 3
    assert summary["n_groups_kept"] == 3 and summary["group_sizes"] == [12, 12, 12]
    # min_group_size=13 drops every group: all classes left to the generalist
    none = ConfusableGroups(n_groups=6, method=method, min_group_size=13).fit(cov)
    assert none.groups_ == [] and none.unassigned_.size == 39 and len(none.dropped_groups_) == 6


def test_zero_variance_classes_are_unassigned(easy_planted) -> None:
    cov, truth = easy_planted
    padded = np.zeros((122, 122))
    padded[:120, :120] = cov  # classes 120, 121: never predicted
    est = ConfusableGroups(n_groups=6, method="kmeans").fit(padded)
    assert est.zero_variance_classes_.tolist() == [120, 121]
    assert est.unassigned_.tolist() == [120, 121]
    assert est.labels_[120] == -1 and est.cluster_labels_[121] == -1
    assert adjusted_rand_score(truth, est.labels_[:120]) >= 0.9


def test_choose_n_groups_finds_planted_number(easy_planted, easy_softmax) -> None:
    cov, _ = easy_planted
    assert choose_n_groups(cov) == 6
    assert choose_n_groups(cov, candidates=range(2, 15), rule="silhouette") == 6
    assert choose_n_groups(easy_softmax[0]) == 5
    est = ConfusableGroups(method="kmeans").fit(cov)
    assert est.n_groups_ == 6 and len(est.groups_) == 6


def test_stability_near_one_on_easy_case(easy_planted) -> None:
    cov, _ = easy_planted
    assert stability_score(cov, n_groups=6, method="kmeans", seeds=(0, 1, 2)) >= 0.99
    est = ConfusableGroups(n_groups=6, method="faiss", compute_stability=True).fit(cov)
    assert est.stability_ >= 0.99 and est.summary()["stability"] == est.stability_
    assert not hasattr(ConfusableGroups(n_groups=6).fit(cov), "stability_")


def test_stability_drops_on_noise() -> None:
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((80, 200))
    cov = np.cov(noise)  # no group structure at all
    assert stability_score(cov, n_groups=8, method="kmeans") < 0.6


def test_sparse_input_path_recovers_groups() -> None:
    truth = planted_labels(2_000, 40, seed=2)
    acc = SparseCoPredictionAccumulator(2_000, top_k=5)
    for batch in simulate_topk_predictions(truth, 20_000, top_k=5, seed=2):
        acc.update(batch)
    cov = acc.matrix()
    assert cov.nnz < 0.1 * 2_000**2
    est = ConfusableGroups(n_groups=40, method="auto").fit(cov)
    assert est.method_ == "faiss" and len(est.groups_) == 40
    assert adjusted_rand_score(truth, est.labels_) >= 0.95
    for method in ("minibatch_kmeans", "spectral"):
        other = ConfusableGroups(n_groups=40, method=method, normalize="l2", n_init=3).fit(cov)
        assert adjusted_rand_score(truth, other.labels_) >= 0.9, method
    overlapping = ConfusableGroups(n_groups=40, group_size=60).fit(cov)
    assert all(g.size == 60 for g in overlapping.groups_)


def test_sparse_path_never_densifies() -> None:
    k = 50_000  # a dense K x K float32 copy would take 10 GB
    truth = planted_labels(k, 500, seed=3)
    acc = SparseCoPredictionAccumulator(k, top_k=5)
    for batch in simulate_topk_predictions(truth, 30_000, top_k=5, seed=3):
        acc.update(batch)
    cov = acc.matrix()
    tracemalloc.start()
    est = ConfusableGroups(n_groups=20, method="faiss").fit(cov)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert est.labels_.shape == (k,) and est.n_groups_ == 20
    assert peak < 300e6  # bytes
