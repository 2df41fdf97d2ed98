"""The clustering stage's covariance pass alone, for ``benchmarks.scale``'s memory figure.

    python -m benchmarks.scale_covariance PACKED_ROOT RUN_DIR [--actors 2]

Scores the holdout split of the packed set at ``PACKED_ROOT`` with the generalist of the run at
``RUN_DIR`` on Ray Data actors (:func:`orchestration.covariance_job.holdout_statistics`, the
stage's own pass: blocks read by the actors, partial statistics merged in the driver) and prints
the number of examples and the covariance's trace.
"""

from __future__ import annotations

import argparse

import numpy as np

from generalist.data.packed import PackedSource
from orchestration.covariance_job import SPLIT, PassSettings, holdout_statistics
from orchestration.parallel import connect


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("packed_root")
    parser.add_argument("run_dir")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=512)
    args = parser.parse_args(argv)
    source = PackedSource(args.packed_root)
    connect(None, local_num_cpus=args.actors)
    n = source.size(SPLIT)
    halves = (np.arange(n) % 2).astype(np.uint8)              # (N,) the two halves the affinities use
    partial = holdout_statistics(args.run_dir, source, settings=PassSettings(source.num_classes, args.batch_size),
                                 half_of=halves, actors=args.actors)
    covariance = partial.covariance()                          # (K, K)
    print(f"covariance pass: {n:,} holdout examples, K = {source.num_classes:,}, "
          f"trace {float(np.trace(covariance)):.6f}")


if __name__ == "__main__":
    main()
