"""Class descriptors from a class covariance: normalisation, affinity and SVD embeddings.

Class c is described by column C[:, c]. Raw columns scale with class frequency, so they are
normalised first:

* ``"correlation"``: C_ij / sqrt(C_ii C_jj) (the class correlation matrix);
* ``"l2"``: each column scaled to unit L2 norm.

Because C is symmetric, the descriptor of class c is row c of the returned (K, K) matrix.

For large K the descriptors are embedded in d << K dimensions before k-means: rows are
projected onto the top-d right singular vectors of the (K, K) descriptor matrix (randomized
SVD; ``dense_embedding`` never forms the normalised matrix, ``sparse_embedding`` works on CSR).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import TruncatedSVD
from threadpoolctl import threadpool_limits

_BLOCK = 2048
_OVERSAMPLES = 10
DENSE_POWER_ITERATIONS = 1


def column_scales(cov: np.ndarray | sp.csr_matrix, normalize: str) -> np.ndarray:
    """(K,) float64 per-class scale: sqrt(C_cc) for "correlation", ||C[:, c]||_2 for "l2"."""
    if sp.issparse(cov):
        if normalize == "correlation":
            return np.sqrt(np.clip(cov.diagonal(), 0.0, None))
        return np.sqrt(np.asarray(cov.multiply(cov).sum(axis=0), dtype=np.float64).ravel())
    if normalize == "correlation":
        return np.sqrt(np.clip(np.diag(cov).astype(np.float64), 0.0, None))
    out = np.empty(cov.shape[0], dtype=np.float64)
    for start in range(0, cov.shape[0], _BLOCK):
        rows = cov[start : start + _BLOCK].astype(np.float64)
        out[start : start + _BLOCK] = np.sqrt(np.einsum("ij,ij->i", rows, rows))
    return out


def normalized_descriptors(cov: np.ndarray, normalize: str, dtype: type = np.float64) -> np.ndarray:
    """(K, K) class descriptors (row c describes class c), a new array of ``dtype``.

    "correlation" gives the symmetric correlation matrix; "l2" gives rows
    C[c, :] / ||C[:, c]|| (unit-norm rows). Classes with zero scale must be removed first.
    """
    scales = column_scales(cov, normalize).astype(dtype)
    out = np.empty(cov.shape, dtype=dtype)
    for start in range(0, cov.shape[0], _BLOCK):
        stop = start + _BLOCK
        block = out[start:stop]
        np.divide(cov[start:stop], scales[start:stop, None], out=block, casting="unsafe")
        if normalize == "correlation":
            block /= scales[None, :]
    return out


def normalized_sparse(cov: sp.csr_matrix, normalize: str) -> sp.csr_matrix:
    """Sparse analogue of ``normalized_descriptors``: (K, K) CSR, rows are class descriptors."""
    inv = 1.0 / column_scales(cov, normalize)
    out = sp.diags(inv) @ cov
    if normalize == "correlation":
        out = out @ sp.diags(inv)
    return sp.csr_matrix(out)


def affinity(cov: np.ndarray | sp.csr_matrix, normalize: str) -> np.ndarray | sp.csr_matrix:
    """Symmetric non-negative (K, K) affinity for spectral methods.

    A_ij = max(C_ij / sqrt(s_i s_j), 0) with s the per-class scales of ``normalize``
    (for "correlation" this is the correlation matrix clipped at 0; for "l2" the column norms
    take the place of the standard deviations). Sparse input gives a sparse result.
    """
    scales = column_scales(cov, normalize)
    if normalize == "l2":
        scales = np.sqrt(scales)
    inv = 1.0 / scales
    if sp.issparse(cov):
        out = sp.csr_matrix(sp.diags(inv) @ cov @ sp.diags(inv))
        out.data = np.clip(out.data, 0.0, None)
        out.eliminate_zeros()
        return out
    out = np.empty(cov.shape, dtype=cov.dtype)
    for start in range(0, cov.shape[0], _BLOCK):
        stop = start + _BLOCK
        block = cov[start:stop] * inv[start:stop, None] * inv[None, :]
        out[start:stop] = np.clip(block, 0.0, None)
    symmetrize_inplace(out)
    return out


def symmetrize_inplace(mat: np.ndarray) -> None:
    """Make square ``mat`` exactly symmetric blockwise (mirror the upper triangle); no K x K temp."""
    k = mat.shape[0]
    for start in range(0, k, _BLOCK):
        stop = min(start + _BLOCK, k)
        block = mat[start:stop, start:stop]
        mat[start:stop, start:stop] = (block + block.T) / 2
        mat[stop:, start:stop] = mat[start:stop, stop:].T


def sparse_embedding(
    descriptors: sp.csr_matrix, n_components: int, random_state: int
) -> np.ndarray:
    """(K, d) float32 embedding U * S of sparse descriptors by randomized TruncatedSVD.

    Euclidean distances between embedded rows approximate those between the descriptor rows
    (projection onto the top-d right singular subspace), so k-means on the embedding
    approximates k-means on the descriptors without densifying K x K. Runs in float32 with 3
    power iterations; cost ~ 8 * nnz * d + 10 * K * d^2.
    """
    n_components = int(min(n_components, descriptors.shape[0] - 1))
    svd = TruncatedSVD(
        n_components=n_components, algorithm="randomized", n_iter=3, random_state=random_state
    )
    # The work is single-threaded sparse products plus tall-skinny QR/LU, which multi-threaded
    # OpenBLAS runs several times slower than one thread (measured: 29 s vs 39 s at K=1e5).
    with threadpool_limits(1, user_api="blas"):
        return svd.fit_transform(descriptors.astype(np.float32)).astype(np.float32)


def default_svd_components(n_groups: int, num_classes: int, sparse: bool = True) -> int:
    """Embedding size d: n_groups + 16 for sparse input, 2 * n_groups for dense (<= K - 1).

    k well-separated groups put their between-group structure in a k-dimensional subspace
    (the top-k principal subspace is the continuous relaxation of k-means, Ding & He 2004),
    so about one dimension per group is the floor.

    * Sparse top-k co-prediction matrices: k + 16; many more dims mostly add noise (planted
      K = 100,000, 100 groups: d = 116 gave ARI 0.99, d = 200 gave 0.94, d = 50 gave 0.96).
    * Dense covariances also carry strong directions shared across groups (class frequency,
      global confusion modes), which can outrank the directions of small groups; 2k leaves
      room for up to k of them. On planted low-rank covariances with a rank-32 cross-group
      term and unequal group sizes (K = 3,000-5,000, k = 50-80, 8 seeds), d = k + 16 lost
      0.12-0.13 ARI against k-means on the full K dims, d = 1.5k + 16 and d = 2k matched it
      (within 0.01); on simulated softmax covariances every d in [1.5k, 2k] matched or beat
      the full dims.
    """
    return int(min(n_groups + 16 if sparse else 2 * n_groups, num_classes - 1))


def dense_embedding(
    cov: np.ndarray,
    normalize: str,
    n_components: int,
    random_state: int,
    n_iter: int = DENSE_POWER_ITERATIONS,
) -> np.ndarray:
    """(K, d) float32 normalised descriptors projected onto their top-d right singular vectors.

    Same result (up to rounding and the randomized SVD's error) as projecting the rows of
    ``normalized_descriptors(cov, normalize)`` (X = diag(r) C diag(q), r = 1 / scales, q = r
    for "correlation", 1 for "l2"), but X is applied implicitly: products with X cost one
    (K, K) x (K, l) GEMM in cov's dtype and no normalised K x K copy is made.

    Args:
        cov: (K, K) dense symmetric covariance, float32 or float64, every class with
            non-zero scale.
        n_components: d (capped at K - 1).
        n_iter: power iterations of the randomized SVD; 2 + 2 * n_iter GEMMs in all.
    """
    k = cov.shape[0]
    inv = (1.0 / column_scales(cov, normalize)).astype(cov.dtype)
    row = inv[:, None]
    col = row if normalize == "correlation" else None

    def matmat(m: np.ndarray) -> np.ndarray:  # X @ m
        return (cov @ (m if col is None else m * col)) * row

    def rmatmat(m: np.ndarray) -> np.ndarray:  # X.T @ m
        out = cov.T @ (m * row)
        return out if col is None else out * col

    return randomized_row_embedding(
        matmat, rmatmat, k, min(n_components, k - 1), random_state, n_iter, cov.dtype
    )


def randomized_row_embedding(
    matmat: Callable[[np.ndarray], np.ndarray],
    rmatmat: Callable[[np.ndarray], np.ndarray],
    num_cols: int,
    n_components: int,
    random_state: int,
    n_iter: int,
    dtype: np.dtype,
) -> np.ndarray:
    """(n, d) float32 rows of an implicit (n, num_cols) matrix X projected on its top-d
    right singular vectors, i.e. U_d * S_d (Halko, Martinsson & Tropp 2011, Alg. 4.4).

    Sketches the range of X with l = d + 10 Gaussian vectors, sharpens it with ``n_iter``
    QR-normalised power iterations of X X^T, and projects X onto it: with B = Q^T X (l, m)
    and B B^T = W S^2 W^T, the embedding is Q W_d S_d (the right singular vectors of B are
    never needed). ``matmat(m)`` must return X @ m and ``rmatmat(m)`` X.T @ m; they are the
    only O(n * num_cols * l) steps (2 + 2 * n_iter calls).
    """
    rng = np.random.default_rng(random_state)
    width = min(n_components + _OVERSAMPLES, num_cols)
    y = matmat(rng.standard_normal((num_cols, width)).astype(dtype))
    for _ in range(n_iter):
        y = matmat(_orthonormal(rmatmat(_orthonormal(y))))
    q = _orthonormal(y)
    b = rmatmat(q).astype(np.float64)  # (m, l) = B^T
    eigval, eigvec = np.linalg.eigh(b.T @ b)  # ascending
    top = np.argsort(eigval)[::-1][:n_components]
    sing = np.sqrt(np.clip(eigval[top], 0.0, None))
    return ((q @ eigvec[:, top].astype(q.dtype)) * sing.astype(q.dtype)).astype(np.float32)


def _orthonormal(y: np.ndarray) -> np.ndarray:
    """Orthonormal basis (n, l) of the columns of tall-skinny (n, l) ``y`` (reduced QR).

    One BLAS thread: multi-threaded OpenBLAS runs tall-skinny QR several times slower
    (measured 0.06 s vs 0.2-1 s for (15,000, 76) float32 on 2 busy cores).
    """
    with threadpool_limits(1, user_api="blas"):
        return np.linalg.qr(y)[0]
