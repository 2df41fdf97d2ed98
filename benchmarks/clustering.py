"""Benchmark: ConfusableGroups(method="kmeans") (scikit-learn) vs method="faiss", end to end.

Usage: python -m benchmarks.clustering [--quick] [--out PATH]

On synthetic class covariances with planted groups (``clustering.planted_covariance``,
float32, low-rank + noise), both estimators are called exactly as a
user calls them, on the same matrix, with n_init=1, max_iter=100 and the same random_state,
and timed from ``fit(cov)`` to return (input validation and normalisation included):

* ``ConfusableGroups(n_groups=k, method="kmeans")``: scikit-learn KMeans (k-means++ seeding
  on all K rows, Lloyd) on the (K, K) float64 correlation-normalised descriptors;
* ``ConfusableGroups(n_groups=k, method="faiss")``: randomized SVD of the normalised
  descriptors to d = 2k dims (1 power iteration: 4 (K, K) x (K, 2k + 10) float32 GEMMs on
  cov; the normalised matrix is never formed), then faiss k-means in d dims (k-means++ on a
  2,000-row sample, Lloyd; 1 faiss thread below 2e8 multiply-adds per iteration, where
  OpenMP overhead dominates; the table's "thr" column).

The faiss path runs first, so any first-touch cost of fresh memory falls on it. Cases
(noise 0.5, equal group sizes): K = 1,000 (k = 20) and K = 15,000 (k = 50). ARIs are
against the planted labels.

Outside --quick more measurements run:

* "faiss-full-dim": faiss k-means on the full K-dim float32 normalised descriptors without
  the projection (the previous faiss path, for reference), at K = 15,000 on the case above
  (run after the faiss path, before sklearn) and on a harder one (noise 1.0, group-size
  spread 0.5, where Lloyd needs tens of iterations; sklearn skipped there);
* the sparse path at K = 100,000: top-5 accumulation of 500,000 simulated predictions, then
  ConfusableGroups(method="faiss") on the sparse matrix, with tracemalloc peak memory (numpy
  and Python allocations; faiss's C++ buffers are not traced) and the process's max RSS.

The last printed line is ``faiss_speedup=<x> ari=<y>`` for K = 15,000: seconds of
method="kmeans" / seconds of method="faiss", and the faiss path's ARI.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import sklearn
from sklearn.metrics import adjusted_rand_score

from clustering import (
    ConfusableGroups,
    SparseCoPredictionAccumulator,
    planted_covariance,
    planted_labels,
    simulate_topk_predictions,
)
from clustering.backends import faiss_kmeans, faiss_threads
from clustering.features import DENSE_POWER_ITERATIONS, normalized_descriptors

SEED = 0
MAX_ITER = 100
REFERENCE = "faiss-full-dim"
RUNS = {
    "faiss": (
        f"randomized SVD of the normalised descriptors to d = 2k dims ({DENSE_POWER_ITERATIONS} "
        "power iteration, float32 GEMMs on cov) + faiss k-means in d dims (k-means++ on a "
        "2,000-row sample, Lloyd)"
    ),
    "kmeans": (
        "sklearn KMeans (k-means++ on all K rows, Lloyd) on the (K, K) float64 "
        "correlation-normalised descriptors"
    ),
}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def fit_row(cov: np.ndarray, truth: np.ndarray, k: int, method: str) -> dict[str, Any]:
    """Time ``ConfusableGroups(n_groups=k, method=method).fit(cov)`` as a user calls it."""
    est, secs = timed(
        lambda: ConfusableGroups(
            n_groups=k, method=method, n_init=1, max_iter=MAX_ITER, random_state=SEED
        ).fit(cov)
    )
    dims = est.n_components_ or int(cov.shape[0])
    return {
        "call": f'ConfusableGroups(n_groups=k, method="{method}", n_init=1, random_state={SEED}).fit(cov)',
        "method": method,
        "runs": RUNS[method],
        "seconds": round(secs, 3),
        "iterations": est.n_iter_,
        "dims_clustered": dims,
        "faiss_threads": faiss_threads(cov.shape[0], dims, k) if method == "faiss" else None,
        "ari": round(float(adjusted_rand_score(truth, est.labels_)), 4),
    }


def unprojected_faiss_row(cov: np.ndarray, truth: np.ndarray, k: int) -> dict[str, Any]:
    """Reference: faiss k-means on the full K-dim float32 descriptors (no projection)."""

    def run() -> tuple[np.ndarray, int]:
        x = normalized_descriptors(cov, "correlation", dtype=np.float32)
        labels, _, n_iter = faiss_kmeans(x, k, random_state=SEED, max_iter=MAX_ITER, n_init=1)
        return labels, n_iter

    (labels, n_iter), secs = timed(run)
    return {
        "call": "normalized_descriptors(float32) + backends.faiss_kmeans (no projection)",
        "method": REFERENCE,
        "runs": "faiss k-means (k-means++ on 2,000 rows) on the (K, K) float32 descriptors",
        "seconds": round(secs, 3),
        "iterations": n_iter,
        "dims_clustered": int(cov.shape[0]),
        "faiss_threads": faiss_threads(cov.shape[0], cov.shape[0], k),
        "ari": round(float(adjusted_rand_score(truth, labels)), 4),
    }


def dense_case(
    k_classes: int, k: int, methods: tuple[str, ...], noise: float = 0.5, spread: float = 0.0
) -> dict[str, Any]:
    """Generate one planted covariance, then time each of ``methods`` on it, in order."""
    (cov, truth), gen_s = timed(
        lambda: planted_covariance(
            k_classes, k, noise=noise, seed=SEED, group_size_spread=spread, dtype=np.float32
        )
    )
    rows = [
        unprojected_faiss_row(cov, truth, k) if m == REFERENCE else fit_row(cov, truth, k, m)
        for m in methods
    ]
    secs = {row["method"]: row["seconds"] for row in rows}
    return {
        "num_classes": k_classes,
        "n_groups": k,
        "input": f"planted low-rank covariance, float32, noise={noise}, group_size_spread={spread}",
        "noise": noise,
        "group_size_spread": spread,
        "generate_s": round(gen_s, 3),
        "svd_power_iterations": DENSE_POWER_ITERATIONS,
        "rows": rows,
        "faiss_speedup": round(secs["kmeans"] / secs["faiss"], 2) if "kmeans" in secs else None,
        "projection_speedup": (
            round(secs[REFERENCE] / secs["faiss"], 2) if REFERENCE in secs else None
        ),
    }


def sparse_case(
    k_classes: int = 100_000, k: int = 100, n_samples: int = 500_000, top_k: int = 5
) -> dict[str, Any]:
    """Top-k accumulation of simulated predictions, then the sparse clustering path."""
    truth = planted_labels(k_classes, k, seed=SEED)
    tracemalloc.start()

    def accumulate() -> SparseCoPredictionAccumulator:
        acc = SparseCoPredictionAccumulator(k_classes, top_k=top_k)
        batches = simulate_topk_predictions(
            truth, n_samples, top_k=top_k, batch_size=2048, seed=SEED
        )
        for batch in batches:
            acc.update(batch)
        return acc

    acc, acc_s = timed(accumulate)
    matrix, matrix_s = timed(acc.matrix)
    acc_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    est, fit_s = timed(
        lambda: ConfusableGroups(n_groups=k, method="faiss", random_state=SEED).fit(matrix)
    )
    fit_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {
        "num_classes": k_classes,
        "n_groups": k,
        "n_predictions": n_samples,
        "top_k": top_k,
        "nnz": int(matrix.nnz),
        "accumulate_s": round(acc_s, 2),
        "matrix_s": round(matrix_s, 2),
        "fit_s": round(fit_s, 2),
        "svd_components": est.n_components_,
        "faiss_iters": est.n_iter_,
        "ari": round(float(adjusted_rand_score(truth, est.labels_)), 4),
        "peak_traced_mb_accumulate": round(acc_peak / 1e6, 1),
        "peak_traced_mb_fit": round(fit_peak / 1e6, 1),
        "dense_kxk_float32_mb": round(k_classes**2 * 4 / 1e6, 1),
        "maxrss_mb_after": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3, 1),
    }


def print_table(dense: list[dict[str, Any]], sparse: dict[str, Any] | None) -> None:
    header = (
        f"{'K':>7} {'k':>4} {'noise':>5} {'spread':>6}  {'method':<15} {'seconds':>8} {'iters':>6} "
        f"{'dims':>6} {'thr':>4} {'ARI':>6}  speedup"
    )
    print(header)
    print("-" * len(header))
    for case in dense:
        for row in case["rows"]:
            speed = ""
            if row["method"] == "faiss":
                speed = ", ".join(
                    f"{case[key]:.1f}x vs {name}"
                    for key, name in (
                        ("faiss_speedup", "kmeans"),
                        ("projection_speedup", REFERENCE),
                    )
                    if case[key] is not None
                )
            print(
                f"{case['num_classes']:>7} {case['n_groups']:>4} {case['noise']:>5} {case['group_size_spread']:>6}  "
                f"{row['method']:<15} {row['seconds']:>8.2f} {row['iterations']!s:>6} "
                f"{row['dims_clustered']:>6} {row['faiss_threads'] or '-'!s:>4} {row['ari']:>6.3f}  {speed}"
            )
        print(f"{'':>27}(planted covariance generated in {case['generate_s']:.2f} s, not timed)")
    print(
        "speedup = seconds(other) / seconds(method='faiss') on the same cov, same seed, n_init=1; "
        "rows ran in the order shown"
    )
    seen = set()
    for row in (r for case in dense for r in case["rows"]):
        if row["method"] not in seen:
            seen.add(row["method"])
            print(f"  {row['method']}: {row['call']}\n      = {row['runs']}")
    if sparse is not None:
        print(
            f"sparse K={sparse['num_classes']:,} k={sparse['n_groups']}: {sparse['n_predictions']:,} top-{sparse['top_k']} "
            f"predictions accumulated in {sparse['accumulate_s']:.1f} s (matrix() {sparse['matrix_s']:.1f} s, "
            f"nnz {sparse['nnz']:,}); fit (SVD to {sparse['svd_components']} dims + faiss) {sparse['fit_s']:.1f} s, "
            f"ARI {sparse['ari']:.3f}; traced peak {sparse['peak_traced_mb_accumulate']:.0f} MB accumulate / "
            f"{sparse['peak_traced_mb_fit']:.0f} MB fit (a dense K x K float32 is {sparse['dense_kxk_float32_mb']:,.0f} MB); "
            f"max RSS {sparse['maxrss_mb_after']:.0f} MB"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="dense K=1,000 and K=15,000 comparisons only (no sparse case, no full-dim faiss)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/clustering.json"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    sparse = None if args.quick else sparse_case()
    both, full = ("faiss", "kmeans"), ("faiss", REFERENCE, "kmeans")
    dense = [dense_case(1_000, 20, both), dense_case(15_000, 50, both if args.quick else full)]
    if not args.quick:
        dense.append(dense_case(15_000, 50, ("faiss", REFERENCE), noise=1.0, spread=0.5))
    big = dense[1]
    headline = {
        "num_classes": big["num_classes"],
        "n_groups": big["n_groups"],
        "faiss_s": big["rows"][0]["seconds"],
        "sklearn_s": big["rows"][1]["seconds"],
        "faiss_speedup": big["faiss_speedup"],
        "ari": big["rows"][0]["ari"],
        "sklearn_ari": big["rows"][1]["ari"],
    }
    result = {
        "mode": "quick" if args.quick else "full",
        "environment": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "sklearn": sklearn.__version__,
            "faiss": faiss.__version__,
            "faiss_max_threads": faiss.omp_get_max_threads(),
        },
        "dense": dense,
        "sparse": sparse,
        "headline": headline,
        "total_s": round(time.perf_counter() - start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(dense, sparse)
    print(f"total {result['total_s']:.1f} s; figures written to {args.out}")
    print(f"faiss_speedup={headline['faiss_speedup']:.2f} ari={headline['ari']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
