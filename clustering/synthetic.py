"""Synthetic class covariances and predictions with planted confusable groups.

Used by the tests and ``benchmarks/clustering.py``. Two covariance generators:

* ``kind="lowrank"`` (default, fast at K = 15,000): a softmax-like low-rank-plus-noise
  covariance. A = S (B B^T + R R^T + delta I) S, where B holds one loading per planted group
  (classes in a group co-vary), R is a rank-32 random cross-group confusion term of relative
  size ``noise``, and S scales classes by sqrt(class frequency) (log-normal frequencies, so
  raw columns scale with frequency as in a real holdout). Then C = A - v v^T / (1^T v) with
  v = A 1: like a softmax covariance (E[p p^T] - m m^T) its rows sum to 0 and the correction
  is proportional to both classes' mass. C is symmetric PSD by construction (Cauchy-Schwarz).
* ``kind="softmax"``: the exact covariance of simulated softmax predictions (logits get a
  boost on the true class's group and on the true class, plus Gaussian noise of std
  ``4 * noise``), accumulated with ``CovarianceAccumulator``. O(n K^2); use for K <= ~2,000.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp

from clustering._validation import check_choice, check_num_classes, check_positive_int
from clustering.accumulate import CovarianceAccumulator
from clustering.features import symmetrize_inplace

_NOISE_RANK = 32
_DIAG = 0.2
_BLOCK = 2048


def planted_labels(
    num_classes: int, n_groups: int, *, seed: int = 0, group_size_spread: float = 0.0
) -> np.ndarray:
    """(K,) planted group id per class; every group has >= 2 classes, ids are shuffled.

    Group sizes are 2 + a share of the remaining K - 2G classes proportional to
    exp(group_size_spread * N(0, 1)); spread 0 gives (near-)equal sizes.
    """
    k = check_num_classes(num_classes)
    g = check_positive_int(n_groups, "n_groups")
    if k < 2 * g:
        raise ValueError(
            f"cannot plant {g} groups of >= 2 classes in {k} classes; pass n_groups <= {k // 2}."
        )
    if group_size_spread < 0:
        raise ValueError(f"group_size_spread must be >= 0, got {group_size_spread}.")
    rng = np.random.default_rng(seed)
    weights = np.exp(group_size_spread * rng.standard_normal(g))
    share = weights / weights.sum() * (k - 2 * g)
    sizes = 2 + np.floor(share).astype(np.int64)
    remainder = k - int(sizes.sum())
    sizes[np.argsort(share - np.floor(share))[::-1][:remainder]] += 1
    return rng.permutation(np.repeat(np.arange(g), sizes))


def planted_covariance(
    num_classes: int,
    n_groups: int,
    *,
    noise: float = 0.5,
    seed: int = 0,
    group_size_spread: float = 0.0,
    kind: str = "lowrank",
    dtype: type = np.float64,
    samples_per_class: int = 30,
) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic (K, K) class covariance with planted confusable groups.

    Args:
        num_classes: K (>= 2 * n_groups).
        n_groups: number of planted groups G.
        noise: strength of structure-free (cross-group) confusion relative to the planted
            within-group confusion; 0.5 is easy, >= 1.5 is hard.
        seed: random seed (labels, frequencies, noise).
        group_size_spread: log-normal spread of group sizes (0 = equal sizes).
        kind: "lowrank" (fast, any K) or "softmax" (simulated predictions, small K).
        dtype: np.float32 or np.float64 for the returned matrix ("lowrank" only; a
            15,000 x 15,000 float32 matrix is 0.9 GB).
        samples_per_class: mean number of simulated predictions per class ("softmax" only).

    Returns:
        cov: (K, K) symmetric positive semi-definite matrix.
        labels: (K,) int64 planted group id per class.
    """
    labels = planted_labels(num_classes, n_groups, seed=seed, group_size_spread=group_size_spread)
    cov = covariance_from_labels(
        labels,
        noise=noise,
        seed=seed + 1,
        kind=kind,
        dtype=dtype,
        samples_per_class=samples_per_class,
    )
    return cov, labels


def covariance_from_labels(
    labels: np.ndarray,
    *,
    noise: float = 0.5,
    seed: int = 0,
    kind: str = "lowrank",
    dtype: type = np.float64,
    samples_per_class: int = 30,
) -> np.ndarray:
    """(K, K) synthetic covariance for given planted group ids; see ``planted_covariance``.

    Args:
        labels: (K,) non-negative int group id per class (any group sizes, including 1).
    """
    check_choice(kind, "kind", ("lowrank", "softmax"))
    if not np.isfinite(noise) or noise < 0:
        raise ValueError(f"noise must be a finite number >= 0, got {noise}.")
    labels = np.asarray(labels)
    check_num_classes(labels.size)
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise ValueError("labels must be non-negative integer group ids, one per class.")
    rng = np.random.default_rng(seed)
    freq = rng.lognormal(0.0, 1.0, size=labels.size)
    freq /= freq.mean()
    if kind == "softmax":
        return _softmax_covariance(labels, freq, noise, samples_per_class, rng)
    return _lowrank_covariance(labels, freq, noise, rng, np.dtype(dtype))


def _lowrank_covariance(
    labels: np.ndarray, freq: np.ndarray, noise: float, rng: np.random.Generator, dtype: np.dtype
) -> np.ndarray:
    """A - v v^T / (1^T v), A = F F^T + D, F = [cross factors | group loadings], blockwise.

    v = A 1 is computed from the factors; the cross term and the rank-one correction come
    from one GEMM per row block ([cross | v'] @ [cross | -v']^T, v' = v / sqrt(1^T v)) written
    in place, then the upper triangle is mirrored so the result is exactly symmetric; only
    the output K x K array is allocated (no (block, K) temporaries).
    """
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be np.float32 or np.float64, got {dtype}.")
    k = labels.size
    scale = np.sqrt(freq)
    loading = scale * (1.0 + 0.1 * rng.standard_normal(k))
    cross = rng.standard_normal((k, _NOISE_RANK)) * (scale * noise / np.sqrt(_NOISE_RANK))[:, None]
    diag = _DIAG * scale**2
    member = sp.csr_matrix((loading, (np.arange(k), labels)), shape=(k, int(labels.max()) + 1))
    mass = cross @ cross.sum(axis=0) + member @ np.asarray(member.sum(axis=0)).ravel() + diag
    mass_scaled = mass / np.sqrt(mass.sum())
    left = np.column_stack([cross, mass_scaled]).astype(dtype)
    right_t = np.ascontiguousarray(np.column_stack([cross, -mass_scaled]).astype(dtype).T)
    cov = np.empty((k, k), dtype=dtype)
    for start in range(0, k, _BLOCK):
        stop = min(start + _BLOCK, k)
        block = cov[start:stop]
        np.matmul(left[start:stop], right_t, out=block)
        within = (member[start:stop] @ member.T).tocoo()
        block[within.row, within.col] += within.data.astype(dtype)
        block[np.arange(stop - start), np.arange(start, stop)] += diag[start:stop].astype(dtype)
    symmetrize_inplace(cov)
    return cov


def _softmax_covariance(
    labels: np.ndarray,
    freq: np.ndarray,
    noise: float,
    samples_per_class: int,
    rng: np.random.Generator,
) -> np.ndarray:
    k = labels.size
    per_class = np.maximum(1, rng.poisson(samples_per_class * freq))
    truth = rng.permutation(np.repeat(np.arange(k), per_class))
    acc = CovarianceAccumulator(k)
    for start in range(0, truth.size, 1024):
        y = truth[start : start + 1024]
        logits = 4.0 * noise * rng.standard_normal((y.size, k))
        logits += 4.0 * (labels[None, :] == labels[y][:, None])
        logits[np.arange(y.size), y] += 2.0
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        acc.update(probs / probs.sum(axis=1, keepdims=True))
    return acc.covariance()


def simulate_topk_predictions(
    labels: np.ndarray,
    n_samples: int,
    *,
    top_k: int = 5,
    noise: float = 1.0,
    group_mass: float = 0.9,
    batch_size: int = 8192,
    seed: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Simulate a generalist's top-k predictions without ever forming (batch, K) arrays.

    For a holdout example of (uniformly drawn) class y in planted group g, the candidate
    classes are g's members plus ``top_k`` distractors (one random class from each of
    ``top_k`` other groups). Candidate logits are N(0, noise^2), +4 for g's members and +2
    more for y; the candidates share ``group_mass`` of the probability (softmax) and the
    remaining 1 - group_mass is spread uniformly over the other ~K classes, so it never
    reaches the top-k. Needs at least top_k + 1 planted groups.

    Args:
        labels: (K,) planted group id per class (e.g. from ``planted_labels``).
        n_samples: number of simulated holdout predictions.

    Yields:
        (values, indices): float64 and int32 arrays of shape (B, top_k), top-k probabilities
        (descending) and their distinct class ids, as ``torch.topk(probs, top_k)`` would give.
    """
    labels = np.asarray(labels)
    members, sizes = _padded_members(labels)
    n_groups = sizes.size
    if n_groups < top_k + 1:
        raise ValueError(f"need at least top_k + 1 = {top_k + 1} planted groups, got {n_groups}.")
    rng = np.random.default_rng(seed)
    for start in range(0, n_samples, batch_size):
        b = min(batch_size, n_samples - start)
        y = rng.integers(0, labels.size, b)
        g = labels[y]
        offsets = 1 + (rng.integers(0, n_groups - 1, b)[:, None] + np.arange(top_k)) % (
            n_groups - 1
        )
        other = (g[:, None] + offsets) % n_groups
        pick = (rng.random((b, top_k)) * sizes[other]).astype(np.int64)
        cand = np.concatenate([members[g], members[other, pick]], axis=1)
        logits = noise * rng.standard_normal(cand.shape)
        logits[:, : members.shape[1]] += 4.0
        logits += 2.0 * (cand == y[:, None])
        logits[cand < 0] = -np.inf
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs *= group_mass / probs.sum(axis=1, keepdims=True)
        top = np.argpartition(-probs, top_k - 1, axis=1)[:, :top_k]
        values = np.take_along_axis(probs, top, axis=1)
        order = np.argsort(-values, axis=1)
        top = np.take_along_axis(top, order, axis=1)
        yield (
            np.take_along_axis(values, order, axis=1),
            np.take_along_axis(cand, top, axis=1).astype(np.int32),
        )


def _padded_members(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(G, max_size) class ids per group padded with -1, and (G,) group sizes."""
    order = np.argsort(labels, kind="stable")
    sizes = np.bincount(labels)
    members = np.full((sizes.size, sizes.max()), -1, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    col = np.arange(labels.size) - np.repeat(starts, sizes)
    members[labels[order], col] = order
    return members, sizes
