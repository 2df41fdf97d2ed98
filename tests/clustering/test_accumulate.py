"""Streaming covariance accumulators against dense references."""

import tracemalloc

import numpy as np
import pytest
import torch

from clustering import CovarianceAccumulator, SparseCoPredictionAccumulator


def _softmax_batches(
    rng: np.random.Generator, sizes: list[int], k: int, temp: float = 1.0
) -> list[np.ndarray]:
    out = []
    for b in sizes:
        logits = rng.standard_normal((b, k)) * 3.0 / temp
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        out.append(p / p.sum(axis=1, keepdims=True))
    return out


def test_dense_accumulator_matches_np_cov_exactly() -> None:
    rng = np.random.default_rng(0)
    batches = _softmax_batches(rng, [1, 7, 64, 3, 200, 0, 31], 25)
    acc = CovarianceAccumulator(25)
    for b in batches:
        acc.update(b)
    allp = np.concatenate(batches)
    assert acc.count == 306
    np.testing.assert_allclose(acc.covariance(), np.cov(allp, rowvar=False), rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        acc.covariance(ddof=0), np.cov(allp, rowvar=False, ddof=0), rtol=0, atol=1e-12
    )
    np.testing.assert_allclose(acc.mean(), allp.mean(axis=0), rtol=0, atol=1e-15)
    cov = acc.covariance()
    assert np.array_equal(cov, cov.T)
    np.testing.assert_allclose(cov.sum(axis=1), 0.0, atol=1e-14)  # softmax rows sum to 1


def test_dense_accumulator_stable_for_peaked_predictions() -> None:
    # Nearly one-hot predictions (a confident generalist): tiny variances, large mean.
    rng = np.random.default_rng(1)
    batches = _softmax_batches(rng, [500] * 8, 10, temp=0.1)
    acc = CovarianceAccumulator(10)
    for b in batches:
        acc.update(b)
    ref = np.cov(np.concatenate(batches), rowvar=False)
    np.testing.assert_allclose(acc.covariance(), ref, rtol=1e-9, atol=1e-14)


def test_dense_accumulator_accepts_torch_and_merges() -> None:
    rng = np.random.default_rng(2)
    a, b = _softmax_batches(rng, [40, 50], 12)
    t = torch.softmax(torch.from_numpy(rng.standard_normal((30, 12))).float(), dim=1)
    left, right = CovarianceAccumulator(12), CovarianceAccumulator(12)
    left.update(a)
    right.update(b)
    right.update(t)
    left.merge(right)
    ref = np.cov(np.concatenate([a, b, t.double().numpy()]), rowvar=False)
    assert left.count == 120
    np.testing.assert_allclose(left.covariance(), ref, rtol=0, atol=1e-12)


def _truncate(p: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.argsort(-p, axis=1)[:, :k]
    q = np.zeros_like(p)
    np.put_along_axis(q, idx, np.take_along_axis(p, idx, axis=1), axis=1)
    member = np.zeros(p.shape, dtype=bool)
    np.put_along_axis(member, idx, True, axis=1)
    return q, member


def test_sparse_accumulator_matches_dense_reference() -> None:
    rng = np.random.default_rng(3)
    batches = _softmax_batches(rng, [50, 13, 80, 7], 30)
    dense_acc = SparseCoPredictionAccumulator(30, top_k=4, flush_every=500)
    topk_acc = SparseCoPredictionAccumulator(30, top_k=4)
    for b in batches:
        dense_acc.update(b)
        t = torch.topk(torch.from_numpy(b), 4)
        topk_acc.update((t.values, t.indices))
    q, member = _truncate(np.concatenate(batches), 4)
    support = (member.T.astype(float) @ member.astype(float)) > 0
    ref_cov = np.where(support, np.cov(q, rowvar=False), 0.0)
    ref_second = q.T @ q / q.shape[0]
    for acc in (dense_acc, topk_acc):
        mat = acc.matrix()
        assert mat.shape == (30, 30) and acc.count == 150
        np.testing.assert_allclose(mat.toarray(), ref_cov, rtol=0, atol=1e-12)
        np.testing.assert_allclose(
            acc.matrix(centered=False).toarray(), ref_second, rtol=0, atol=1e-12
        )
        assert mat.nnz == support.sum() < 30 * 30
        assert abs(mat - mat.T).max() == 0.0


def test_sparse_accumulator_never_allocates_k_by_k() -> None:
    k, top_k = 200_000, 5  # a dense K x K float64 would be 320 GB
    rng = np.random.default_rng(4)
    acc = SparseCoPredictionAccumulator(k, top_k=top_k)
    batches = [
        np.stack([rng.choice(k, top_k, replace=False) for _ in range(256)]) for _ in range(4)
    ]
    tracemalloc.start()
    for idx in batches:
        vals = rng.dirichlet(np.ones(top_k + 1), size=256)[:, :top_k]
        acc.update((vals, idx))
    mat = acc.matrix()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    pairs = {(int(a), int(b)) for idx in batches for row in idx for a in row for b in row}
    assert mat.shape == (k, k) and acc.count == 1024
    assert mat.nnz == len(pairs)  # exactly the co-predicted pairs are stored
    assert peak < 30e6  # bytes; K-length vectors and the ~25k-entry sparse matrix only


def test_sparse_accumulator_with_all_entries_equals_dense() -> None:
    rng = np.random.default_rng(5)
    batches = _softmax_batches(rng, [20, 33], 8)
    sparse_acc, dense_acc = SparseCoPredictionAccumulator(8, top_k=8), CovarianceAccumulator(8)
    for b in batches:
        sparse_acc.update(b)
        dense_acc.update(b)
    np.testing.assert_allclose(
        sparse_acc.matrix().toarray(), dense_acc.covariance(), rtol=0, atol=1e-12
    )


def test_torch_device_path_matches_np_cov() -> None:
    rng = np.random.default_rng(6)
    batches = _softmax_batches(rng, [17, 64, 1, 40], 20)
    acc = CovarianceAccumulator(20, device="cpu")
    for b in batches[:2]:
        acc.update(torch.from_numpy(b))
    other = CovarianceAccumulator(20)  # numpy backend, merged into the torch one
    for b in batches[2:]:
        other.update(b)
    acc.merge(other)
    allp = np.concatenate(batches)
    np.testing.assert_allclose(acc.covariance(), np.cov(allp, rowvar=False), rtol=0, atol=1e-12)
    np.testing.assert_allclose(acc.mean(), allp.mean(axis=0), rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="sums to"):
        acc.update(torch.full((2, 20), 0.1))
