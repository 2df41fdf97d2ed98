"""Synthetic planted covariances are valid covariances with the requested structure."""

import numpy as np

from clustering import planted_covariance, planted_labels, simulate_topk_predictions


def test_lowrank_planted_covariance_is_valid() -> None:
    cov, labels = planted_covariance(300, 12, noise=0.5, seed=4, group_size_spread=0.6)
    assert cov.shape == (300, 300) and cov.dtype == np.float64
    assert np.array_equal(cov, cov.T)
    eig = np.linalg.eigvalsh(cov)
    assert eig.min() >= -1e-12 * eig.max()
    np.testing.assert_allclose(cov.sum(axis=1), 0.0, atol=1e-12 * np.abs(cov).max())  # C 1 = 0
    sizes = np.bincount(labels)
    assert (
        sizes.size == 12 and sizes.sum() == 300 and sizes.min() >= 2 and sizes.max() > sizes.min()
    )
    std = np.sqrt(np.diag(cov))
    corr = cov / np.outer(std, std)
    same = labels[:, None] == labels[None, :]
    off = ~np.eye(300, dtype=bool)
    assert corr[same & off].mean() > 0.5 > abs(corr[~same].mean())


def test_float32_and_softmax_variants() -> None:
    cov32, labels = planted_covariance(400, 8, dtype=np.float32, seed=1)
    assert cov32.dtype == np.float32 and np.array_equal(cov32, cov32.T)
    cov64, labels64 = planted_covariance(400, 8, seed=1)
    assert np.array_equal(labels, labels64)
    np.testing.assert_allclose(cov32, cov64, atol=1e-5 * np.abs(cov64).max())
    soft, soft_labels = planted_covariance(60, 4, kind="softmax", samples_per_class=10, seed=2)
    assert np.array_equal(soft, soft.T)
    np.testing.assert_allclose(soft.sum(axis=1), 0.0, atol=1e-12)
    assert np.linalg.eigvalsh(soft).min() > -1e-12


def test_planted_labels_equal_sizes_and_simulated_topk() -> None:
    labels = planted_labels(100, 10, seed=0)
    assert np.bincount(labels).tolist() == [10] * 10
    batches = list(simulate_topk_predictions(labels, 1_000, top_k=4, batch_size=300, seed=0))
    assert [v.shape for v, _ in batches] == [(300, 4), (300, 4), (300, 4), (100, 4)]
    values = np.concatenate([v for v, _ in batches])
    indices = np.concatenate([i for _, i in batches])
    assert (np.diff(values, axis=1) <= 0).all() and (values.sum(axis=1) <= 0.9 + 1e-12).all()
    assert all(np.unique(row).size == 4 for row in indices)
    same_group = labels[indices[:, 1]] == labels[indices[:, 0]]
    assert same_group.mean() > 0.8  # runner-up is usually a confusable class
