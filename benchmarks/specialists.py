"""Benchmark: specialists trained one after the other vs in parallel on single-CPU Ray workers.

    python -m benchmarks.specialists [--quick] [--out PATH] [--workers N] [--seed S]

Both phases run the stage's real per-specialist job (``orchestration.specialist_job``:
half-and-half batches, holdout early stopping, epoch checkpoints, prior correction) through
the stage's Ray runner (``orchestration.parallel.run_tasks``) on one private local Ray with
``--workers`` CPUs, 1 CPU and 1 torch thread per specialist. Sequential = at most one task in
flight; parallel = all of them. The workers are warmed up first (process start and imports
are paid once per worker, not per specialist), so the ratio measures training throughput.

The generalist is a randomly initialised ``cnn_fast`` on the synthetic ``hierarchy`` data (the
invariant holds for any weights); groups are its planted super-classes.
The phases alternate for ``--rounds`` rounds (3) and the best time of each counts, which keeps
the ratio meaningful on a machine shared with other jobs.
``parallel_speedup`` = sequential wall time / parallel wall time; ``init_invariant_maxdiff``
= max over specialists of ``max |softmax(untrained specialist) - collapsed generalist|`` on
holdout images. ``--quick`` trains 2 specialists on 2 workers (< 60 s on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from generalist.data import create_dataset
from generalist.models import create_model
from orchestration.checkpoints import save_model
from orchestration.config import SpecialistsConfig
from orchestration.parallel import TaskResources, connect, run_tasks
from orchestration.specialist_job import SpecialistJob, train_specialist

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "specialists.json"


def make_generalist(root: Path, data, width: float, seed: int) -> Path:
    """A random-init generalist checkpoint where the specialist job expects one."""
    torch.manual_seed(seed)
    channels, size, _ = data.image_shape
    spec = {"name": "cnn_fast", "num_classes": data.num_classes, "in_channels": channels,
            "image_size": size, "width": width, "depth": 1.0}
    model = create_model(spec["name"], **{k: v for k, v in spec.items() if k != "name"})
    stage_dir = root / "generalist"
    save_model(stage_dir / "model", model, {"model": spec, "class_names": list(data.class_names)})
    return stage_dir


def make_jobs(root: Path, phase: str, groups: list[list[int]], data, settings, seed: int) -> list[SpecialistJob]:
    return [
        SpecialistJob(group_id=i, classes=tuple(g), names=tuple(data.class_names[c] for c in g),
                      group_dir=str(root / phase / f"group_{i:03d}"), run_dir=str(root),
                      seed=seed + i, settings=settings)
        for i, g in enumerate(groups)
    ]


def timed_phase(jobs, shared, max_concurrency: int) -> tuple[float, list[dict[str, Any]]]:
    summaries: list[dict[str, Any]] = []
    started = time.perf_counter()
    failures = run_tasks(train_specialist, jobs, shared=shared, resources=TaskResources(cpus=1),
                         max_concurrency=max_concurrency, max_retries=0,
                         on_result=lambda job, summary: summaries.append(summary))
    seconds = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"specialist {failures[0].item.group_id} failed: {failures[0].error}")
    return seconds, summaries


def run_rounds(root: Path, data, groups, settings, shared, workers: int, rounds: int, seed: int):
    """Alternate sequential and parallel phases; returns their times and the summaries."""
    make_generalist(root, data, width=1.0, seed=seed)
    warm = SpecialistsConfig(epochs=1, batch_size=8, num_batches=1, finetune="head")
    timed_phase(make_jobs(root, "warmup", groups, data, warm, seed), shared, workers)
    times: dict[str, list[float]] = {"sequential": [], "parallel": []}
    summaries: list[dict[str, Any]] = []
    for r in range(rounds):
        for phase, in_flight in (("sequential", 1), ("parallel", workers)):
            jobs = make_jobs(root, f"{phase}{r}", groups, data, settings, seed)
            seconds, done = timed_phase(jobs, shared, in_flight)
            times[phase].append(seconds)
            summaries += done
    return times, summaries


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 specialists on 2 workers (< 60 s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--workers", type=int, default=2, help="single-CPU Ray workers (= specialists)")
    parser.add_argument("--rounds", type=int, default=3, help="sequential/parallel rounds (best time counts)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    workers = 2 if args.quick else args.workers
    num_batches = 20 if args.quick else 100
    started = time.perf_counter()
    data = create_dataset("hierarchy", seed=args.seed, num_superclasses=workers, classes_per_superclass=4,
                          train_per_class=40, holdout_per_class=10, test_per_class=1, image_size=32)
    groups = [list(range(4 * s, 4 * s + 4)) for s in range(workers)]
    settings = SpecialistsConfig(epochs=2, patience=2, batch_size=64, num_batches=num_batches,
                                 finetune="all", cpus_per_specialist=1)
    shared = {"train_images": data.train.images, "train_labels": data.train.labels,
              "holdout_images": data.holdout.images, "holdout_labels": data.holdout.labels}
    where = connect(None, local_num_cpus=workers)
    with tempfile.TemporaryDirectory(prefix="bench-specialists-") as tmp:
        times, summaries = run_rounds(Path(tmp), data, groups, settings, shared, workers, args.rounds, args.seed)
    seq_s, par_s = min(times["sequential"]), min(times["parallel"])
    result = {
        "quick": args.quick, "seed": args.seed, "workers": workers, "ray": where,
        "specialists": len(groups), "epochs": settings.epochs, "batches_per_epoch": num_batches,
        "rounds": args.rounds, "times": times,
        "sequential_seconds": seq_s, "parallel_seconds": par_s, "parallel_speedup": seq_s / par_s,
        "parallel_examples_per_s": len(groups) * settings.epochs * num_batches * settings.batch_size / par_s,
        "init_invariant_maxdiff": max(r["metrics"]["init_invariant_maxdiff"] for r in summaries),
        "environment": {"torch": torch.__version__, "cpus": os.cpu_count(),
                        "load_average": os.getloadavg(), "machine": platform.machine()},
        "wall_seconds": time.perf_counter() - started,
    }
    report(result, args.out)


def report(result: dict[str, Any], out: Path) -> None:
    print(f"{'phase':<12} {'specialists':>11} {'in flight':>9}  seconds per round")
    for phase, in_flight in (("sequential", 1), ("parallel", result["workers"])):
        rounds = "  ".join(f"{t:6.2f}" for t in result["times"][phase])
        print(f"{phase:<12} {result['specialists']:>11} {in_flight:>9}  {rounds}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} in {result['wall_seconds']:.1f} s (load {result['environment']['load_average'][0]:.1f})")
    print(f"parallel_speedup={result['parallel_speedup']:.2f} "
          f"init_invariant_maxdiff={result['init_invariant_maxdiff']:.3e}")


if __name__ == "__main__":
    main()
