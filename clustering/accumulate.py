"""Streaming accumulators for the class covariance of generalist predictions (DESIGN 2.1).

``CovarianceAccumulator`` keeps the exact dense K x K covariance in float64 (moderate K).
``SparseCoPredictionAccumulator`` keeps only each prediction's top-k entries and stores a
``scipy.sparse`` matrix, so memory grows with the number of co-predicted class pairs instead
of K^2 (very large K). Neither ever holds all predictions in memory.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from clustering._validation import (
    PROB_SUM_TOL,
    check_num_classes,
    check_positive_int,
    check_probs,
    check_probs_torch,
    to_numpy,
)
from clustering.features import symmetrize_inplace

_EMPTY_HOLDOUT = (
    "the accumulator has seen no predictions: the holdout split is empty. Give it examples "
    "(e.g. reserve a non-zero held-out fraction of the training data) and call update() with "
    "softmax(generalist logits) for each batch before asking for the covariance."
)


class CovarianceAccumulator:
    """Streaming, exact class covariance of probability vectors, C = Cov_x[p(x)].

    Uses the pairwise (Chan et al.) update: each batch's mean and centred scatter matrix
    (float64) are merged into the running ones, which is numerically stable and matches
    ``np.cov(all_probs, rowvar=False)`` to ~1e-15.

    Memory: O(K^2) float64 (one K x K scatter matrix), independent of the number of examples.
    Compute: 2 K^2 flops per example; at K = 15,000 pass ``device="cuda"`` to run the float64
    updates (and the validation) on the GPU that produced the predictions.

    Args:
        num_classes: K, the number of generalist classes (>= 2).
        device: None for numpy on the CPU; a torch device (e.g. "cuda", "cpu") to keep the
            running float64 statistics as torch tensors there. Results are numpy either way.
    """

    def __init__(self, num_classes: int, device: Any = None) -> None:
        self.num_classes = check_num_classes(num_classes)
        self.device = device
        self._count = 0
        if device is None:
            self._mean = np.zeros(self.num_classes, dtype=np.float64)
            self._scatter = np.zeros((self.num_classes, self.num_classes), dtype=np.float64)
        else:
            import torch

            self._mean = torch.zeros(self.num_classes, dtype=torch.float64, device=device)
            self._scatter = torch.zeros(
                (self.num_classes, self.num_classes), dtype=torch.float64, device=device
            )

    @property
    def count(self) -> int:
        """Number of predictions seen so far."""
        return self._count

    def update(self, probs: Any) -> None:
        """Add a batch of predictions.

        Args:
            probs: (B, K) numpy array or torch tensor; each row a probability vector
                (entries >= 0, summing to 1 within 1e-4). B == 0 is a no-op.
        """
        if self.device is None:
            batch = check_probs(probs, self.num_classes)
        else:
            batch = check_probs_torch(probs, self.num_classes, self.device)
        n_b = batch.shape[0]
        if n_b == 0:
            return
        mean_b = batch.mean(0)
        centred = batch - mean_b
        self._merge(n_b, mean_b, centred.T @ centred)

    def merge(self, other: CovarianceAccumulator) -> None:
        """Fold another accumulator (e.g. from another data-parallel worker) into this one."""
        if not isinstance(other, CovarianceAccumulator) or other.num_classes != self.num_classes:
            raise ValueError(
                "can only merge a CovarianceAccumulator with the same num_classes "
                f"({self.num_classes})."
            )
        if other.count:
            self._merge(other.count, self._like(other._mean), self._like(other._scatter))

    def _like(self, array: Any) -> Any:
        """``array`` (numpy or torch) converted to this accumulator's backend and device."""
        if self.device is None:
            return _to_numpy64(array)
        import torch

        return torch.as_tensor(_to_numpy64(array) if not torch.is_tensor(array) else array).to(
            device=self.device, dtype=torch.float64
        )

    def _merge(self, n_b: int, mean_b: Any, scatter_b: Any) -> None:
        n_a = self._count
        n = n_a + n_b
        delta = mean_b - self._mean
        self._scatter += scatter_b
        if n_a:
            self._scatter += (delta[:, None] * delta[None, :]) * (n_a * n_b / n)
        self._mean = self._mean + delta * (n_b / n)
        self._count = n

    def mean(self) -> np.ndarray:
        """(K,) mean prediction E_x[p(x)]."""
        if self._count == 0:
            raise ValueError(_EMPTY_HOLDOUT)
        return _to_numpy64(self._mean).copy()

    def covariance(self, ddof: int = 1) -> np.ndarray:
        """(K, K) float64 covariance; equals ``np.cov(all_probs, rowvar=False, ddof=ddof)``.

        Args:
            ddof: delta degrees of freedom (1: unbiased, 0: population).
        """
        if self._count == 0:
            raise ValueError(_EMPTY_HOLDOUT)
        if self._count <= ddof:
            raise ValueError(
                f"covariance with ddof={ddof} needs more than {ddof} predictions, got "
                f"{self._count}; add more holdout examples or pass ddof=0."
            )
        cov = _to_numpy64(self._scatter) / (self._count - ddof)
        symmetrize_inplace(cov)
        return cov


def _to_numpy64(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array, dtype=np.float64)


class SparseCoPredictionAccumulator:
    """Sparse class covariance restricted to co-predicted pairs, for very large K.

    Definitions (n = number of predictions). For a prediction p(x), let q(x) be p(x) with all
    entries outside its top-k set T(x) set to zero ("truncated prediction"). The accumulator
    keeps the sparse second moment S = sum_x q(x) q(x)^T (non-zero only on pairs that were
    both in some T(x), the *co-prediction support*) and the dense (K,) vector s = sum_x q(x).

    ``matrix(centered=True, ddof=1)`` returns the symmetric CSR matrix M with, for (i, j) in
    the support, ``M_ij = (S_ij - s_i s_j / n) / (n - ddof)``, i.e. exactly the sample
    covariance ``np.cov(Q, rowvar=False, ddof=ddof)`` of the truncated predictions Q restricted
    to the support; entries off the support (pairs never co-predicted, whose true covariance is
    the tiny non-positive -s_i s_j / (n (n - ddof))) are left out. ``centered=False`` returns
    the non-negative co-prediction matrix S / n. Only the upper triangle of S is stored, so
    memory is O(K + nnz / 2) while accumulating, never K x K dense.

    Args:
        num_classes: K (>= 2).
        top_k: number of entries kept per prediction (>= 1; values above K keep all K, which
            makes ``matrix()`` the exact dense covariance in sparse format).
        flush_every: buffered (row, col, value) triples before they are folded into the CSR.
    """

    def __init__(self, num_classes: int, top_k: int = 10, flush_every: int = 4_000_000) -> None:
        self.num_classes = check_num_classes(num_classes)
        self.top_k = min(check_positive_int(top_k, "top_k"), self.num_classes)
        self.flush_every = check_positive_int(flush_every, "flush_every")
        self._count = 0
        self._sum = np.zeros(self.num_classes, dtype=np.float64)
        self._second = sp.csr_matrix((self.num_classes, self.num_classes), dtype=np.float64)
        self._buffer: list[tuple[np.ndarray, np.ndarray]] = []
        self._buffered = 0

    @property
    def count(self) -> int:
        """Number of predictions seen so far."""
        return self._count

    def update(self, probs_or_topk: Any) -> None:
        """Add a batch of predictions.

        Args:
            probs_or_topk: either dense probabilities (B, K) (rows are probability vectors;
                array, tensor or list of rows), or a tuple ``(values, indices)`` of shape
                (B, top_k) each, e.g. the output of
                ``torch.topk(probs, top_k)``: the top-k probabilities and their class indices
                (distinct per row) of probability vectors.
        """
        if isinstance(probs_or_topk, tuple) and len(probs_or_topk) == 2:
            values, indices = self._check_topk(*probs_or_topk)
        else:
            values, indices = self._topk_of_dense(probs_or_topk)
        if values.shape[0] == 0:
            return
        self._count += values.shape[0]
        np.add.at(self._sum, indices.ravel(), values.ravel())
        self._buffer.append((values, indices))
        self._buffered += values.size * self.top_k
        if self._buffered >= self.flush_every:
            self._flush()

    def merge(self, other: SparseCoPredictionAccumulator) -> None:
        """Fold another accumulator (same num_classes and top_k) into this one."""
        if (
            not isinstance(other, SparseCoPredictionAccumulator)
            or other.num_classes != self.num_classes
            or other.top_k != self.top_k
        ):
            raise ValueError(
                "can only merge a SparseCoPredictionAccumulator with the same num_classes and top_k."
            )
        self._flush()
        other._flush()
        self._second = (self._second + other._second).tocsr()
        self._sum += other._sum
        self._count += other._count

    def matrix(self, centered: bool = True, ddof: int = 1) -> sp.csr_matrix:
        """(K, K) symmetric float64 CSR matrix; see the class docstring for the definition.

        Args:
            centered: True for the sparse covariance on the co-prediction support,
                False for the raw co-prediction second moment S / n.
            ddof: delta degrees of freedom of the covariance (centered=True only).
        """
        if self._count == 0:
            raise ValueError(_EMPTY_HOLDOUT)
        self._flush()
        second = self._second.tocoo()
        n = self._count
        if not centered:
            data = second.data / n
        else:
            if n <= ddof:
                raise ValueError(
                    f"covariance with ddof={ddof} needs more than {ddof} predictions, got {n}; "
                    "add more holdout examples or pass ddof=0."
                )
            data = (second.data - self._sum[second.row] * self._sum[second.col] / n) / (n - ddof)
        off = second.row != second.col  # mirror the stored upper triangle: exactly symmetric
        rows = np.concatenate([second.row, second.col[off]])
        cols = np.concatenate([second.col, second.row[off]])
        shape = (self.num_classes, self.num_classes)
        return sp.csr_matrix((np.concatenate([data, data[off]]), (rows, cols)), shape=shape)

    def _flush(self) -> None:
        if not self._buffer:
            return
        values = np.concatenate([v for v, _ in self._buffer])
        indices = np.concatenate([i for _, i in self._buffer])
        self._buffer, self._buffered = [], 0
        k = self.top_k
        rows = np.repeat(indices, k, axis=1).ravel()
        cols = np.tile(indices, (1, k)).ravel()
        data = (values[:, :, None] * values[:, None, :]).ravel()
        upper = rows <= cols  # S is symmetric: store the upper triangle only
        shape = (self.num_classes, self.num_classes)
        batch = sp.coo_matrix((data[upper], (rows[upper], cols[upper])), shape=shape).tocsr()
        self._second = (self._second + batch).tocsr()

    def _topk_of_dense(self, probs: Any) -> tuple[np.ndarray, np.ndarray]:
        batch = check_probs(probs, self.num_classes)
        k = self.top_k
        if k == self.num_classes:
            idx = np.broadcast_to(np.arange(k), batch.shape).copy()
        else:
            idx = np.argpartition(-batch, k - 1, axis=1)[:, :k]
        return np.take_along_axis(batch, idx, axis=1), idx.astype(self._index_dtype())

    def _check_topk(self, values: Any, indices: Any) -> tuple[np.ndarray, np.ndarray]:
        vals = to_numpy(values, name="values").astype(np.float64)
        idx = to_numpy(indices, name="indices")
        if vals.ndim != 2 or vals.shape != idx.shape or vals.shape[1] != self.top_k:
            raise ValueError(
                f"top-k values and indices must both have shape (batch, top_k={self.top_k}), got "
                f"{vals.shape} and {idx.shape}; compute them with torch.topk(probs, {self.top_k}) "
                "or pass the dense (batch, num_classes) probabilities."
            )
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"indices must be integers, got dtype {idx.dtype}.")
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_classes):
            raise ValueError(
                f"indices must lie in [0, {self.num_classes}); got out-of-range class ids."
            )
        if not np.isfinite(vals).all():
            raise ValueError("top-k values contain NaN or inf; check the generalist's logits.")
        if (vals < 0).any():
            raise ValueError(
                "top-k values contain negative entries; pass softmax probabilities, not logits."
            )
        if (vals.sum(axis=1) > 1.0 + PROB_SUM_TOL).any():
            raise ValueError(
                "top-k values of a row sum to more than 1, so they are not taken from a probability "
                "vector; pass torch.topk(softmax(logits), k)."
            )
        srt = np.sort(idx, axis=1)
        if (np.diff(srt, axis=1) == 0).any():
            raise ValueError(
                "top-k indices repeat a class within a row; each row needs distinct classes."
            )
        return vals, idx.astype(self._index_dtype())

    def _index_dtype(self) -> type:
        return np.int32 if self.num_classes < 2**31 - 1 else np.int64
