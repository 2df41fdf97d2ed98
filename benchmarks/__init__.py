"""Benchmarks, run as modules from the repository root (``python -m benchmarks.<name>``):

    python -m benchmarks.clustering [--quick]    # faiss vs scikit-learn k-means
    python -m benchmarks.specialists [--quick]   # sequential vs parallel specialists on Ray
    python -m benchmarks.combine [--quick]       # batched fixed point vs per-example descent
    python -m benchmarks.distill [--quick]       # KD step from the cache vs cross-entropy
    python -m benchmarks.run_all [--quick]       # all of them + the pipeline over seeds
"""
