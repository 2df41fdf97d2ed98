"""Input validation shared by the clustering components.

Every check raises ``ValueError`` with a message that names the problem and how to fix it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

PROB_SUM_TOL = 1e-4
_SYM_RTOL = 1e-5
_BLOCK = 2048
_TILE = 512

METHODS = ("auto", "kmeans", "minibatch_kmeans", "spectral", "agglomerative", "faiss")
NORMALIZATIONS = ("correlation", "l2")


def to_numpy(array: Any, name: str = "probs") -> np.ndarray:
    """Return ``array`` (numpy array, torch tensor or nested list) as a numpy array.

    Torch tensors are detached and moved to the CPU; torch is never imported here.
    """
    if hasattr(array, "detach") and hasattr(array, "cpu"):
        array = array.detach().cpu()
        if str(getattr(array, "dtype", "")) == "torch.bfloat16":
            array = array.float()
        array = array.numpy()
    try:
        return np.asarray(array)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{name} could not be converted to an array ({exc}); pass a numpy array or torch tensor."
        ) from exc


def check_num_classes(num_classes: int) -> int:
    """Validate a class count: an integer >= 2."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer):
        raise ValueError(
            f"num_classes must be an int, got {type(num_classes).__name__}; pass the generalist's "
            "number of output classes."
        )
    if num_classes < 2:
        raise ValueError(
            f"num_classes={num_classes} but confusable groups need at least 2 classes (K >= 2); "
            "pass the generalist's number of output classes."
        )
    return int(num_classes)


def check_probs(probs: Any, num_classes: int) -> np.ndarray:
    """Validate a batch of probability vectors and return it as a float64 numpy array.

    Args:
        probs: (B, K) array-like or torch tensor; each row must be a probability vector
            (entries >= 0, summing to 1 within 1e-4).
        num_classes: K.

    Returns:
        (B, K) float64 array.
    """
    arr = to_numpy(probs)
    _check_prob_shape(arr.shape, num_classes)
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ValueError(f"probs must be real numbers, got dtype {arr.dtype}.")
    arr = arr.astype(np.float64, copy=False)
    _check_prob_values(arr, np)
    return arr


def check_probs_torch(probs: Any, num_classes: int, device: Any) -> Any:
    """Like ``check_probs`` but returns a float64 torch tensor on ``device`` (checks run there)."""
    import torch

    t = probs if torch.is_tensor(probs) else torch.as_tensor(np.asarray(probs))
    _check_prob_shape(tuple(t.shape), num_classes)
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"probs must be real numbers, got dtype {t.dtype}.")
    t = t.detach().to(device=device, dtype=torch.float64)
    _check_prob_values(t, torch)
    return t


def _check_prob_shape(shape: tuple[int, ...], num_classes: int) -> None:
    if len(shape) != 2:
        raise ValueError(
            f"probs must be 2-D (batch, num_classes), got shape {shape}; reshape a single "
            "prediction with probs[None, :]."
        )
    if shape[1] != num_classes:
        raise ValueError(
            f"probs has {shape[1]} columns but the accumulator was built for num_classes="
            f"{num_classes}; pass predictions over all {num_classes} classes."
        )


def _check_prob_values(arr: Any, xp: Any) -> None:
    """Value checks shared by numpy (xp=np) and torch (xp=torch) batches."""
    if arr.shape[0] == 0:
        return
    if not bool(xp.isfinite(arr).all()):
        raise ValueError(
            "probs contains NaN or inf; check the generalist's logits (e.g. fp16 overflow) before "
            "applying softmax."
        )
    if bool((arr < 0).any()):
        raise ValueError(
            "probs contains negative entries, so rows are not probability vectors; pass "
            "softmax(logits), not the logits themselves."
        )
    sums = arr.sum(1)
    bad = abs(sums - 1.0) > PROB_SUM_TOL
    if bool(bad.any()):
        row = int(bad.nonzero()[0][0])
        raise ValueError(
            f"row {row} of probs sums to {float(sums[row]):.6g}, not 1 (tolerance {PROB_SUM_TOL}); "
            "pass softmax(logits) computed in float32 or float64."
        )


def check_cov(cov: Any) -> np.ndarray | sp.csr_matrix:
    """Validate a class covariance: square (K, K) with K >= 2, finite and symmetric.

    Dense input is returned as a float32/float64 ndarray (no copy when already one);
    sparse input is returned as a float64 CSR matrix. The symmetry check is blockwise, so it
    never allocates a second K x K array.
    """
    if sp.issparse(cov):
        mat = sp.csr_matrix(cov, dtype=np.float64)
        _check_square(mat.shape)
        if not np.isfinite(mat.data).all():
            raise ValueError(
                "cov contains NaN or inf; recompute the covariance from finite probabilities."
            )
        diff = abs(mat - mat.T)
        scale = abs(mat).max() if mat.nnz else 0.0
        if diff.nnz and diff.max() > _SYM_RTOL * scale + 1e-12:
            raise ValueError(
                "cov is not symmetric; a covariance must satisfy C == C.T (symmetrise with "
                "(C + C.T) / 2 if the asymmetry is rounding)."
            )
        return mat
    arr = to_numpy(cov, name="cov")
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float64)
    _check_square(arr.shape)
    scale = 0.0
    for start in range(0, arr.shape[0], _BLOCK):
        rows = arr[start : start + _BLOCK]
        low, high = float(rows.min()), float(rows.max())  # NaN propagates; no temporaries
        if not (np.isfinite(low) and np.isfinite(high)):
            raise ValueError(
                "cov contains NaN or inf; recompute the covariance from finite probabilities."
            )
        scale = max(scale, -low, high)
    if _max_asymmetry(arr) > _SYM_RTOL * scale + 1e-12:
        raise ValueError(
            "cov is not symmetric; a covariance must satisfy C == C.T (symmetrise with "
            "(C + C.T) / 2 if the asymmetry is rounding)."
        )
    return arr


def _max_asymmetry(arr: np.ndarray) -> float:
    """max |A_ij - A_ji| over tiles of the upper triangle (cache-friendly, no K x K temp)."""
    k, worst = arr.shape[0], 0.0
    for i in range(0, k, _TILE):
        for j in range(i, k, _TILE):
            diff = arr[i : i + _TILE, j : j + _TILE] - arr[j : j + _TILE, i : i + _TILE].T
            worst = max(worst, float(np.abs(diff).max()))
    return worst


def _check_square(shape: tuple[int, ...]) -> None:
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(
            f"cov must be a square (K, K) class-covariance matrix, got shape {shape}; pass "
            "CovarianceAccumulator.covariance() or SparseCoPredictionAccumulator.matrix()."
        )
    if shape[0] < 2:
        raise ValueError(
            f"cov is {shape[0]}x{shape[1]} but confusable groups need at least 2 classes (K >= 2)."
        )


def check_n_groups(n_groups: Any, num_classes: int, name: str = "n_groups") -> int:
    """Validate a group count: an integer in [1, num_classes]."""
    if isinstance(n_groups, bool) or not isinstance(n_groups, int | np.integer):
        raise ValueError(f"{name} must be an int or None, got {n_groups!r}.")
    if n_groups < 1 or n_groups > num_classes:
        raise ValueError(
            f"{name}={n_groups} is out of range for {num_classes} clusterable classes; pass "
            f"1 <= {name} <= {num_classes}, or n_groups=None to choose it automatically."
        )
    return int(n_groups)


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    """Validate a string option against its allowed values."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; use one of {list(choices)}.")
    return str(value)


def check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    """Validate an integer option that must be >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return int(value)


def check_groups(groups: Any, num_classes: int) -> list[np.ndarray]:
    """Validate a list of class-index groups (each a 1-D int array-like with entries in [0, K))."""
    out = []
    for gid, group in enumerate(groups):
        arr = np.asarray(group)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"group {gid} must be a 1-D array of integer class indices.")
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ValueError(
                f"group {gid} has class indices outside [0, {num_classes}); groups must index "
                "the covariance's classes."
            )
        out.append(arr.astype(np.int64))
    return out
