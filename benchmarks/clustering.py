"""Benchmark: scikit-learn KMeans vs faiss k-means for confusable-group discovery.

Usage: python benchmarks/clustering.py [--quick] [--out PATH]

On synthetic class covariances with planted groups (``clustering.planted_covariance``,
float32, low-rank + noise), both back-ends cluster the SAME correlation-normalised float32
class descriptors (the K x K matrix ConfusableGroups clusters), with n_init=1:

* matched: both start from the same k-means++ centroids (drawn once on a 2,000-row sample,
  timed separately) and run Lloyd iterations, at most 50, until assignments stop changing
  (sklearn: tol=0 strict convergence; faiss: objective stops improving). This isolates the
  Lloyd implementation.
* end-to-end: each back-end seeds itself, as the library runs it: sklearn KMeans(init=
  "k-means++", n_init=1, max_iter=100) seeds on all K rows; the faiss path
  (``ConfusableGroups(method="faiss")``'s back-end) seeds with k-means++ on a 2,000-row
  sample, then Lloyd up to 100 iterations.
* sklearn-float64 (full mode only): sklearn KMeans on a float64 copy, which is what
  ``ConfusableGroups(method="kmeans")`` runs.

K = 1,000 (k = 20) runs everything in both modes. K = 15,000 (k = 50) runs the sklearn
end-to-end and float64 variants only outside --quick (sklearn's k-means++ on float32 input
with d = 15,000 takes minutes on 2 cores). Outside --quick the sparse path also runs at
K = 100,000: top-5 accumulation of 500,000 simulated predictions, then
ConfusableGroups(method="faiss") on the sparse matrix, with tracemalloc peak memory (numpy and
Python allocations, including the simulator's (2,048, ~1,000) batches; faiss's C++ buffers are
not traced) and the process's max RSS.

The last printed line is ``faiss_speedup=<x> ari=<y>`` for K = 15,000: sklearn seconds /
faiss seconds of the end-to-end comparison in full mode and of the matched comparison in
--quick mode (the line before it says which), and faiss's ARI against the planted groups.
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
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

# `python benchmarks/clustering.py` puts benchmarks/ first on sys.path, where this file would
# shadow the `clustering` package: import the package from the repository root instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from clustering import (  # noqa: E402
    ConfusableGroups,
    SparseCoPredictionAccumulator,
    planted_covariance,
    planted_labels,
    simulate_topk_predictions,
)
from clustering.backends import faiss_kmeans, faiss_lloyd, kmeans_plusplus_init  # noqa: E402
from clustering.features import normalized_descriptors  # noqa: E402

MATCHED_MAX_ITER = 50
E2E_MAX_ITER = 100
SEED = 0


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def sklearn_run(
    x: np.ndarray, k: int, init: Any, max_iter: int, tol: float
) -> tuple[np.ndarray, int]:
    km = KMeans(k, init=init, n_init=1, max_iter=max_iter, tol=tol, random_state=SEED)
    km.fit(x)
    return km.labels_, int(km.n_iter_)


def comparison(name: str, truth: np.ndarray, sk: tuple, fa: tuple, note: str) -> dict[str, Any]:
    (sk_labels, sk_iter), sk_s = sk
    (fa_labels, fa_iter), fa_s = fa
    return {
        "comparison": name,
        "note": note,
        "sklearn_s": round(sk_s, 3),
        "sklearn_iters": sk_iter,
        "sklearn_ari": round(float(adjusted_rand_score(truth, sk_labels)), 4),
        "faiss_s": round(fa_s, 3),
        "faiss_iters": fa_iter,
        "faiss_ari": round(float(adjusted_rand_score(truth, fa_labels)), 4),
        "faiss_speedup": round(sk_s / fa_s, 2),
    }


def dense_case(k_classes: int, k: int, full_sklearn: bool) -> dict[str, Any]:
    """Generate, normalise once, then run the matched and end-to-end comparisons."""
    start = time.perf_counter()
    cov, truth = planted_covariance(k_classes, k, noise=0.5, seed=SEED, dtype=np.float32)
    gen_s = time.perf_counter() - start
    start = time.perf_counter()
    x = normalized_descriptors(cov, "correlation", dtype=np.float32)
    norm_s = time.perf_counter() - start
    del cov
    init, seed_s = timed(lambda: kmeans_plusplus_init(x, k, SEED))
    rows = []

    def faiss_matched() -> tuple[np.ndarray, int]:
        _, labels, _, n_iter = faiss_lloyd(x, init.copy(), SEED, MATCHED_MAX_ITER)
        return labels, n_iter

    def faiss_e2e() -> tuple[np.ndarray, int]:
        labels, _, n_iter = faiss_kmeans(x, k, random_state=SEED, max_iter=E2E_MAX_ITER, n_init=1)
        return labels, n_iter

    rows.append(
        comparison(
            "matched",
            truth,
            timed(lambda: sklearn_run(x, k, init, MATCHED_MAX_ITER, 0.0)),
            timed(faiss_matched),
            "same k-means++ centroids (seeding time excluded), Lloyd to convergence, <= 50 iters",
        )
    )
    faiss_own = timed(faiss_e2e)
    if full_sklearn:
        rows.append(
            comparison(
                "end-to-end",
                truth,
                timed(lambda: sklearn_run(x, k, "k-means++", E2E_MAX_ITER, 1e-4)),
                faiss_own,
                "own seeding: sklearn k-means++ on all rows (float32 input: re-upcast to float64 "
                "at every seeding step) vs faiss path (k-means++ on 2,000 rows)",
            )
        )
        x64 = x.astype(np.float64)
        rows.append(
            comparison(
                "sklearn-float64",
                truth,
                timed(lambda: sklearn_run(x64, k, "k-means++", E2E_MAX_ITER, 1e-4)),
                faiss_own,
                "sklearn on a float64 copy (what method='kmeans' runs) vs the faiss path",
            )
        )
        del x64
    else:
        (labels, n_iter), secs = faiss_own
        rows.append(
            {
                "comparison": "faiss-path",
                "note": "faiss path alone (sklearn end-to-end skipped in --quick)",
                "faiss_s": round(secs, 3),
                "faiss_iters": n_iter,
                "faiss_ari": round(float(adjusted_rand_score(truth, labels)), 4),
            }
        )
    return {
        "num_classes": k_classes,
        "n_groups": k,
        "input": "correlation-normalised float32 (K, K) descriptors, planted noise=0.5",
        "generate_s": round(gen_s, 3),
        "normalize_s": round(norm_s, 3),
        "shared_seeding_s": round(seed_s, 3),
        "rows": rows,
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
        "svd_components": k + 16,
        "faiss_iters": est.n_iter_,
        "ari": round(float(adjusted_rand_score(truth, est.labels_)), 4),
        "peak_traced_mb_accumulate": round(acc_peak / 1e6, 1),
        "peak_traced_mb_fit": round(fit_peak / 1e6, 1),
        "dense_kxk_float32_mb": round(k_classes**2 * 4 / 1e6, 1),
        "maxrss_mb_after": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3, 1),
    }


def print_table(dense: list[dict[str, Any]], sparse: dict[str, Any] | None) -> None:
    header = f"{'K':>7} {'k':>4}  {'comparison':<16} {'sklearn s (it)':>15} {'faiss s (it)':>13} {'speedup':>8} {'ARI skl':>8} {'ARI faiss':>9}"
    print(header)
    print("-" * len(header))
    for case in dense:
        for row in case["rows"]:
            sk = (
                f"{row['sklearn_s']:.2f} ({row['sklearn_iters']})"
                if "sklearn_s" in row
                else "skipped"
            )
            speed = f"{row['faiss_speedup']:.1f}x" if "faiss_speedup" in row else "-"
            sk_ari = f"{row['sklearn_ari']:.3f}" if "sklearn_ari" in row else "-"
            fa = f"{row['faiss_s']:.2f} ({row['faiss_iters']})"
            print(
                f"{case['num_classes']:>7} {case['n_groups']:>4}  {row['comparison']:<16} {sk:>15} {fa:>13} "
                f"{speed:>8} {sk_ari:>8} {row['faiss_ari']:>9.3f}"
            )
        print(
            f"{'':>13}  generate {case['generate_s']:.2f} s, normalise {case['normalize_s']:.2f} s, "
            f"shared k-means++ seeding {case['shared_seeding_s']:.2f} s"
        )
    for case in dense:
        for row in case["rows"]:
            print(f"  K={case['num_classes']} {row['comparison']}: {row['note']}")
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
        help="skip sklearn end-to-end at K=15,000 and the sparse case",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/clustering.json"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    sparse = None if args.quick else sparse_case()
    dense = [
        dense_case(1_000, 20, full_sklearn=True),
        dense_case(15_000, 50, full_sklearn=not args.quick),
    ]
    basis = "matched" if args.quick else "end-to-end"
    big = next(row for row in dense[1]["rows"] if row["comparison"] == basis)
    headline = {
        "num_classes": 15_000,
        "n_groups": 50,
        "basis": basis,
        "sklearn_s": big["sklearn_s"],
        "faiss_s": big["faiss_s"],
        "faiss_speedup": big["faiss_speedup"],
        "ari": big["faiss_ari"],
    }
    result = {
        "mode": "quick" if args.quick else "full",
        "environment": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "sklearn": sklearn.__version__,
            "faiss": faiss.__version__,
            "faiss_threads": faiss.omp_get_max_threads(),
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
    print(f"headline K=15,000 k=50 basis: {basis} ({big['note']})")
    if args.quick:
        print(
            "  (--quick compares Lloyd implementations only; sklearn's own k-means++ seeding on "
            "this float32 input, the bulk of its end-to-end time, runs outside --quick)"
        )
    print(f"faiss_speedup={headline['faiss_speedup']:.2f} ari={headline['ari']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
