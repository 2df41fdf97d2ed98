"""Choosing the number of confusable groups (DESIGN 2.1)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
from sklearn.metrics import silhouette_score
from sklearn.utils.extmath import randomized_svd

from clustering import backends
from clustering._validation import NORMALIZATIONS, check_choice, check_cov, check_n_groups
from clustering.features import affinity, column_scales, normalized_descriptors

_EXACT_EIG_MAX = 2_000
_DEFAULT_MAX_CANDIDATE = 100


def choose_n_groups(
    cov: np.ndarray | sp.spmatrix,
    *,
    candidates: Sequence[int] | None = None,
    normalize: str = "correlation",
    rule: str = "eigengap",
    random_state: int = 0,
) -> int:
    """Choose the number of confusable groups from a (K, K) class covariance.

    Rules:
        * ``"eigengap"`` (default): build the non-negative affinity A (see
          ``features.affinity``), its normalised form M = D^-1/2 A D^-1/2 (D = row sums), and
          its eigenvalues l_1 >= l_2 >= ... (exact for K <= 2,000, otherwise randomized SVD of
          the PSD shift M + I). With n well-separated groups M has n eigenvalues near 1 and then
          a drop, so the rule returns the candidate n maximising the gap l_n - l_{n+1}.
        * ``"silhouette"``: k-means (sklearn, seed ``random_state``) on the normalised class
          descriptors for every candidate; returns the candidate with the largest mean
          silhouette (Euclidean). Dense input only; one clustering per candidate.

    Args:
        cov: (K, K) dense or sparse class covariance (K >= 3). Zero-variance classes are
            ignored.
        candidates: group counts to consider, each in [1, K - 1] (``"silhouette"`` needs >= 2);
            default 2 .. min(K // 2, 100).
        normalize: "correlation" or "l2" (as in ``ConfusableGroups``).
        rule: "eigengap" or "silhouette".

    Returns:
        The chosen number of groups (one of ``candidates``).
    """
    check_choice(normalize, "normalize", NORMALIZATIONS)
    check_choice(rule, "rule", ("eigengap", "silhouette"))
    mat = active_submatrix(check_cov(cov), normalize)
    k = mat.shape[0]
    if k < 3:
        raise ValueError(
            f"choosing n_groups needs at least 3 classes with non-zero variance, got {k}; pass n_groups explicitly."
        )
    if candidates is None:
        candidates = range(2, max(2, min(k // 2, _DEFAULT_MAX_CANDIDATE)) + 1)
    cands = sorted({check_n_groups(c, k - 1, name="candidate") for c in candidates})
    if not cands:
        raise ValueError("candidates is empty; pass at least one group count, e.g. range(2, 21).")
    if rule == "silhouette":
        return _by_silhouette(mat, cands, normalize, random_state)
    eig = normalized_affinity_eigenvalues(mat, normalize, max(cands) + 1, random_state)
    gaps = [eig[c - 1] - eig[c] for c in cands]
    return int(cands[int(np.argmax(gaps))])


def active_submatrix(mat: np.ndarray | sp.csr_matrix, normalize: str) -> np.ndarray | sp.csr_matrix:
    """``mat`` restricted to classes with non-zero scale (no copy when all are active)."""
    active = active_classes(mat, normalize)
    if active.all():
        return mat
    idx = np.flatnonzero(active)
    return mat[idx][:, idx] if sp.issparse(mat) else mat[np.ix_(idx, idx)]


def active_classes(mat: np.ndarray | sp.csr_matrix, normalize: str) -> np.ndarray:
    """(K,) bool mask of classes with non-zero variance / column norm (clusterable classes)."""
    diag = mat.diagonal() if sp.issparse(mat) else np.diag(mat)
    scale = float(np.abs(diag).max()) if diag.size else 0.0
    if (diag < -1e-9 * max(scale, 1e-300)).any():
        raise ValueError(
            "cov has a negative diagonal entry (negative variance), so it is not a covariance; "
            "pass CovarianceAccumulator.covariance() or SparseCoPredictionAccumulator.matrix()."
        )
    scales = column_scales(mat, normalize)
    top = scales.max() if scales.size else 0.0
    if top <= 0:
        raise ValueError(
            "every class has zero variance in cov (the generalist predicted the same "
            "distribution for every holdout example); check the holdout predictions."
        )
    return scales > 1e-12 * top


def normalized_affinity_eigenvalues(
    mat: np.ndarray | sp.csr_matrix, normalize: str, n_eig: int, random_state: int = 0
) -> np.ndarray:
    """Largest ``n_eig`` eigenvalues (descending) of D^-1/2 A D^-1/2; A = ``affinity(mat)``."""
    aff = affinity(mat, normalize)
    k = aff.shape[0]
    inv_sqrt_deg = 1.0 / np.sqrt(np.asarray(aff.sum(axis=1)).ravel())
    if sp.issparse(aff):
        norm_aff = sp.diags(inv_sqrt_deg) @ aff @ sp.diags(inv_sqrt_deg)
        shifted = norm_aff + sp.identity(k, format="csr")
    else:
        aff *= inv_sqrt_deg[:, None]
        aff *= inv_sqrt_deg[None, :]
        if k <= _EXACT_EIG_MAX:
            return np.linalg.eigvalsh(aff)[::-1][:n_eig]
        aff[np.diag_indices(k)] += 1.0
        shifted = aff
    n_eig = min(n_eig, k - 1)
    _, sing, _ = randomized_svd(
        shifted, n_eig, n_oversamples=20, n_iter=6, random_state=random_state
    )
    return np.sort(sing)[::-1] - 1.0


def _by_silhouette(
    mat: np.ndarray | sp.csr_matrix, cands: list[int], normalize: str, seed: int
) -> int:
    if sp.issparse(mat):
        raise ValueError(
            "rule='silhouette' needs a dense cov; use rule='eigengap' for sparse input."
        )
    if cands[0] < 2:
        raise ValueError(
            "rule='silhouette' needs candidates >= 2 (silhouette is undefined for 1 group)."
        )
    x = normalized_descriptors(mat, normalize)
    scores = []
    for n in cands:
        labels, _, _ = backends.sklearn_kmeans(x, n, random_state=seed, max_iter=100, n_init=1)
        scores.append(silhouette_score(x, labels) if np.unique(labels).size > 1 else -1.0)
    return int(cands[int(np.argmax(scores))])
