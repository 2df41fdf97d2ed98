"""Benchmark: a distillation training step with cached soft targets vs plain cross-entropy.

    python -m benchmarks.distill [--quick] [--out PATH] [--threads N] [--run RUN_DIR]

The same student (``cnn`` at width 0.5 by default) trains on glyph-sized inputs (1x32x32,
K = 320, batch 128) in two ways, each with its own copy of the same initial weights and its
own AdamW, each step being what the distill stage runs per batch (``distill_one_epoch`` on
that one batch, with the stage's ``DistillObjective``):

* ``ce``: the objective at alpha = 0 without a teacher (the stage's hard-labels row);
* ``kd (dense)``: the stage's cached path: the teacher ``make_teacher(probs_fn=...)`` reads
  ``q = SoftTargetCache.targets(ids, 1.0)`` per batch from a soft-target cache on disk
  (memory-mapped float16 shards), and the objective (T=4, alpha=0.9) softens it to
  ``softmax(log q / T)``;
* ``kd (top-k)`` (full run only): the same from a top-k cache (k = 32 of K).

A step is everything the training loop does per batch: gathering the batch (uint8 -> float),
reading the targets, forward, loss, backward, optimizer step. The cache holds random but valid
distributions (peaky softmaxes), written with the cache's own writer
(``specialists.ensemble.write_cache``); only reading it is timed. After a warm-up the variants
run interleaved step by step (one step of each on the same batch, the order rotating), for
``--rounds`` rounds of ``--steps`` batches, so load from other processes hits all of them alike;
each variant's figure is its median step time (``vs ce``: ratio of medians). ``kd_step_ratio``
= the median over batches of KD (dense) step / CE step on the same batch, in wall time (target
<= 1.15; pairing cancels slow changes of the machine's load); ``kd_step_cpu_ratio`` = the ratio
of median thread CPU times, which a busy machine disturbs less. The target read and the
objective alone are timed separately (medians over 20 batches).

``--run RUN_DIR`` prints the distill stage's accuracy table (``RUN_DIR/distill/results.json``:
name, top-1, top-5, parameters, latency) when it exists. ``--quick`` (< 60 s on 2 cores) runs
fewer rounds and only the dense cache. Run it from the repository root.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from distill.train import (
    IndexedBatch,
    TeacherFn,
    build_objective,
    distill_one_epoch,
    make_teacher,
)
from generalist.models import count_parameters, create_model
from generalist.train import build_optimizer
from specialists.ensemble import SoftTargetCache
from specialists.ensemble import write_cache as write_soft_cache

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "distill.json"
TEMPERATURE, ALPHA = 4.0, 0.9


# ------------------------------------------------------------------------------ the cache
def random_q(n: int, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    """``(n, K)`` peaky distributions like a trained ensemble's: softmax of scaled noise plus a
    boost on one class."""
    logits = 2.0 * torch.randn(n, num_classes, generator=gen, dtype=torch.float64)
    top = torch.randint(num_classes, (n,), generator=gen)
    logits[torch.arange(n), top] += 8.0
    return logits.softmax(dim=1)


def write_cache(out: Path, q: torch.Tensor, *, dense_max_classes: int, top_k: int,
                shard_size: int) -> SoftTargetCache:
    """A soft-target cache of ``q`` written by the cache's own writer (what ``build_cache`` does
    after the ensemble ran), then opened with the real reader."""
    n, num_classes = q.shape
    identity = {"name": "random", "options": {}, "seed": 0, "split": "train", "n_examples": n,
                "labels_sha256": ""}
    write_soft_cache(out, q, class_names=[f"c{i}" for i in range(num_classes)], identity=identity,
                     teacher={"random": True}, top_k=top_k, dense_max_classes=dense_max_classes,
                     shard_size=shard_size)
    return SoftTargetCache(out)


def cache_teacher(cache: SoftTargetCache) -> TeacherFn:
    """The distill stage's cached teacher: ``q`` at T = 1 for a batch of example ids, read from the
    cache (the objective softens it to ``softmax(log q / T)``)."""
    return make_teacher(probs_fn=lambda x, ids: cache.targets(ids, 1.0).to(x.device))


# ------------------------------------------------------------------------------ the steps
class Variant:
    """One student + optimizer and the stage's objective: ``teacher`` None = hard labels only."""

    def __init__(self, name: str, student: torch.nn.Module, teacher: TeacherFn | None) -> None:
        self.name, self.student, self.teacher = name, copy.deepcopy(student), teacher
        self.objective = build_objective(temperature=TEMPERATURE, alpha=ALPHA if teacher is not None else 0.0)
        self.optimizer = build_optimizer(self.student, "adamw", lr=3e-3, weight_decay=5e-4)
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def step(self, images: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> None:
        """One training step, as the distill stage runs it; appends its wall and thread CPU seconds."""
        start, start_cpu = time.perf_counter(), time.thread_time()
        batch = IndexedBatch(images[ids].float().div_(255.0), labels[ids], ids)
        distill_one_epoch(self.student, [batch], self.optimizer, None, objective=self.objective,
                          teacher=self.teacher, epoch=0)
        self.cpu.append(time.thread_time() - start_cpu)
        self.wall.append(time.perf_counter() - start)


def time_parts(variant: Variant, images: torch.Tensor, batches: list[torch.Tensor],
               num_classes: int) -> dict[str, float]:
    """Median seconds of the target read alone and of the objective (forward + backward through
    the logits only) alone, on the same batches."""
    assert variant.teacher is not None
    read, loss_s = [], []
    for ids in batches:
        x = images[ids].float().div_(255.0)
        start = time.perf_counter()
        said = variant.teacher(x, ids)
        read.append(time.perf_counter() - start)
        logits = torch.randn(len(ids), num_classes, requires_grad=True)
        y = torch.randint(num_classes, (len(ids),))
        start = time.perf_counter()
        variant.objective(logits, y, said)[0].backward()
        loss_s.append(time.perf_counter() - start)
    return {"read_ms": 1e3 * statistics.median(read), "loss_ms": 1e3 * statistics.median(loss_s)}


def run_timing(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(args.seed)
    k, n = args.classes, args.examples
    images = torch.randint(0, 256, (n, 1, args.image_size, args.image_size), dtype=torch.uint8,
                           generator=gen)
    labels = torch.randint(k, (n,), generator=gen)
    q = random_q(n, k, gen)
    caches = {"kd (dense)": write_cache(tmp / "dense", q, dense_max_classes=1024, top_k=32,
                                        shard_size=args.shard_size)}
    if not args.quick:
        caches["kd (top-k)"] = write_cache(tmp / "topk", q, dense_max_classes=0, top_k=32,
                                           shard_size=args.shard_size)
    torch.manual_seed(args.seed)
    student = create_model(args.student, num_classes=k, in_channels=1, image_size=args.image_size,
                           width=args.width)
    variants = [Variant("ce", student, None)]
    variants += [Variant(name, student, cache_teacher(cache)) for name, cache in caches.items()]
    order = torch.randperm(n, generator=gen)
    cursor = 0

    def next_batch() -> torch.Tensor:  # random example ids, like a shuffled epoch
        nonlocal cursor
        if cursor + args.batch > n:
            cursor = 0
        cursor += args.batch
        return order[cursor - args.batch:cursor]

    for v in variants:  # warm-up: allocator, AdamW state, page cache of the shards
        for _ in range(2):
            v.step(images, labels, next_batch())
        v.wall.clear()
        v.cpu.clear()
    round_ratios = []
    for r in range(args.rounds):
        for i in range(args.steps):  # one step of each variant on the same batch, order rotating
            ids = next_batch()
            shift = (r * args.steps + i) % len(variants)
            for v in variants[shift:] + variants[:shift]:
                v.step(images, labels, ids)
        ce = statistics.median(variants[0].wall[-args.steps:])
        round_ratios.append(statistics.median(variants[1].wall[-args.steps:]) / ce)
    ce_wall, ce_cpu = statistics.median(variants[0].wall), statistics.median(variants[0].cpu)
    rows = []
    for v in variants:
        wall, cpu = statistics.median(v.wall), statistics.median(v.cpu)
        row = {"variant": v.name, "steps": len(v.wall), "median_ms": 1e3 * wall,
               "min_ms": 1e3 * min(v.wall), "cpu_median_ms": 1e3 * cpu,
               "ratio_vs_ce": wall / ce_wall, "cpu_ratio_vs_ce": cpu / ce_cpu}
        if v.teacher is not None:
            # the same batch, adjacent in time: slow changes of the machine's load cancel
            paired = [a / b for a, b in zip(v.wall, variants[0].wall, strict=True)]
            row["paired_ratio"] = statistics.median(paired)
            row.update(time_parts(v, images, [next_batch() for _ in range(20)], k))
            row["cache"] = repr(caches[v.name])
        rows.append(row)
    return {"rows": rows, "kd_step_ratio": rows[1]["paired_ratio"],
            "kd_step_cpu_ratio": rows[1]["cpu_ratio_vs_ce"], "round_ratios": round_ratios,
            "student": {"name": args.student, "width": args.width,
                        "params": count_parameters(student)},
            "shape": {"batch": args.batch, "image": [1, args.image_size, args.image_size],
                      "classes": k, "examples": n}}


# ------------------------------------------------------------------------------ reporting
def print_timing(result: dict[str, Any]) -> None:
    s, shape = result["student"], result["shape"]
    print(f"student {s['name']} width {s['width']} ({s['params']:,} parameters), batch "
          f"{shape['batch']} x {shape['image']}, K = {shape['classes']}, T = {TEMPERATURE}, "
          f"alpha = {ALPHA}")
    header = (f"{'variant':<12} {'steps':>6} {'median ms':>10} {'min ms':>8} {'vs ce':>7} "
              f"{'paired':>7} {'cpu ms':>8} {'cpu vs ce':>9} {'read ms':>8} {'loss ms':>8}")
    print(header)
    print("-" * len(header))
    for row in result["rows"]:
        read = f"{row['read_ms']:8.2f}" if "read_ms" in row else f"{'-':>8}"
        loss = f"{row['loss_ms']:8.2f}" if "loss_ms" in row else f"{'-':>8}"
        paired = f"{row['paired_ratio']:7.3f}" if "paired_ratio" in row else f"{'-':>7}"
        print(f"{row['variant']:<12} {row['steps']:>6} {row['median_ms']:>10.1f} "
              f"{row['min_ms']:>8.1f} {row['ratio_vs_ce']:>7.3f} {paired} {row['cpu_median_ms']:>8.1f} "
              f"{row['cpu_ratio_vs_ce']:>9.3f} {read} {loss}")
    print("per-round kd/ce: " + " ".join(f"{r:.3f}" for r in result["round_ratios"]))


def print_run_table(run_dir: Path) -> dict[str, Any] | None:
    """The distill stage's accuracy table of ``run_dir``, if it has one."""
    path = run_dir / "distill" / "results.json"
    if not path.exists():
        print(f"no {path} (the distill stage of that run has not finished); no accuracy table")
        return None
    rows = json.loads(path.read_text())["rows"]
    header = f"{'name':<16} {'top1':>7} {'top5':>7} {'params':>11} {'latency_ms':>11}"
    print(f"distill results of {run_dir}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['name']:<16} {r['top1']:>7.4f} {r['top5']:>7.4f} {r['params']:>11,} "
              f"{r['latency_ms']:>11.3f}")
    return {"path": str(path), "rows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="dense cache only, fewer rounds (< 60 s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--run", type=Path, default=None, help="print RUN/distill/results.json")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch default)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of --steps batches (6 quick, 12 else)")
    parser.add_argument("--steps", type=int, default=4, help="steps per variant and round")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--classes", type=int, default=320)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--examples", type=int, default=4096, help="examples in the cache")
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--student", default="cnn")
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    args.rounds = args.rounds or (6 if args.quick else 12)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        timing = run_timing(args, Path(tmp))
    result = {
        "quick": args.quick, "seed": args.seed, "temperature": TEMPERATURE, "alpha": ALPHA,
        "rounds": args.rounds, "steps_per_round": args.steps, **timing,
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "cpus": os.cpu_count(), "load_average": os.getloadavg(),
                        "machine": platform.machine(), "device": "cpu"},
    }
    print_timing(result)
    if args.run is not None:
        result["run_results"] = print_run_table(args.run)
    result["wall_seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} in {result['wall_seconds']:.1f} s "
          f"(threads {result['environment']['threads']}, load {result['environment']['load_average'][0]:.1f})")
    print(f"kd_step_ratio={result['kd_step_ratio']:.3f} "
          f"kd_step_cpu_ratio={result['kd_step_cpu_ratio']:.3f}")


if __name__ == "__main__":
    main()
