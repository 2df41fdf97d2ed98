"""Benchmark: memory stays flat as data grows, data-parallel scaling, input pipeline throughput.

    python -m benchmarks.scale [--quick] [--out PATH] [--data-dir DIR]

1. **Memory.** A large-class synthetic set (the ``hierarchy`` generator; full: 10,000 classes
   with N = 20,000 and 200,000 training images, ``--quick``: 1,000 classes with N = 5,000 and
   50,000; holdout and test a fifth of train each, 32 x 32) is packed once with
   ``specdistill data pack`` into ``--data-dir`` (kept, and reused while its manifest is
   complete). At N and at 10 N the generalist stage (``specdistill run --only generalist``,
   one epoch) and the covariance pass over the training split run as their own commands, and
   the peak resident memory of every process of each (driver, Ray's processes, workers) is
   read from ``/proc`` (``benchmarks.scale_probe``). ``rss_ratio_10x`` = max over commands and
   process roles of peak(10 N) / peak(N).
2. **Data-parallel scaling.** The generalist on the 10 N set (2 epochs, ``--quick``; 3 in full),
   2 Ray Train workers x 1 CPU against 1 worker x 1 CPU (the driver, one torch thread), same
   global batch and epochs: ``ddp_speedup`` = training images per second of the pair / of the one
   over the epochs after the first (start-up, process-group set-up and the first epoch's warm-up
   are not counted; long epochs keep per-epoch costs such as opening shards small), and both
   final holdout losses.
3. **Input pipeline.** Decoded + augmented images per second on one core at 32 px and 224 px
   (``benchmarks.scale_input``).

Prints the figures, writes them to ``--out`` (``benchmarks/results/scale.json``), and ends with
``rss_ratio_10x=<x> ddp_speedup=<y> input_img_per_s_per_core=<z>`` (z at 32 px).
Goals: ``rss_ratio_10x <= 1.3``, ``ddp_speedup >= 1.6`` (needs 2 idle cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.scale_input import measure as measure_input
from benchmarks.scale_probe import ratio_10x, run_measured

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "scale.json"
DEFAULT_DATA = HERE / "results" / "scale" / "data"
SIZES = {  # (super-classes, classes per super-class, train per class at N, at 10 N)
    "quick": (40, 25, 5, 50),
    "full": (100, 100, 2, 20),
}
GENERALIST = ["generalist.model=cnn_fast", "generalist.width=0.5", "generalist.batch_size=256",
              "generalist.eval_batch_size=512", "run.num_threads=1"]


def pack(data_dir: Path, supers: int, per_super: int, per_class: int) -> Path:
    """The packed hierarchy set with ``per_class`` training images per class (packed once)."""
    out = data_dir / f"hierarchy-k{supers * per_super}-n{per_class}"
    manifest = out / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("complete"):
        return out
    rest = max(1, per_class // 5)
    options = {"num_superclasses": supers, "classes_per_superclass": per_super, "train_per_class": per_class,
               "holdout_per_class": rest, "test_per_class": rest, "image_size": 32}
    command = [sys.executable, "-m", "orchestration.cli", "data", "pack", "hierarchy", str(out)]
    for key, value in options.items():
        command += ["--option", f"{key}={value}"]
    started = time.perf_counter()
    run_measured(command, log=data_dir / f"{out.name}.log")
    print(f"  packed {out.name} in {time.perf_counter() - started:.0f} s")
    return out


def generalist_peaks(data: Path, work: Path, env: dict[str, str]) -> dict[str, int]:
    """Peak RSS by process role of ``specdistill run --only generalist`` for one epoch on ``data``."""
    command = [sys.executable, "-m", "orchestration.cli", "run", "--only", "generalist", "data.name=packed",
               f"data.root={data}", "data.options={}", f"run.dir={work / data.name}",
               "generalist.epochs=1", *GENERALIST]
    return run_measured(command, env=env, log=work / f"generalist-{data.name}.log")


def covariance_peaks(data: Path, work: Path, env: dict[str, str]) -> dict[str, int]:
    """Peak RSS by process role of the covariance pass of the generalist trained on ``data``."""
    command = [sys.executable, "-m", "benchmarks.scale_covariance", str(data), str(work / data.name)]
    return run_measured(command, env=env, log=work / f"covariance-{data.name}.log")


def memory_phase(sizes: tuple[int, int, int, int], data_dir: Path, work: Path) -> dict[str, Any]:
    supers, per_super, small, large = sizes
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    runs: dict[str, dict[str, dict[str, int]]] = {}
    for per_class in (small, large):
        data = pack(data_dir, supers, per_super, per_class)
        started = time.perf_counter()
        runs[str(per_class)] = {"generalist": generalist_peaks(data, work, env),
                                "covariance": covariance_peaks(data, work, env)}
        print(f"  N = {per_class * supers * per_super:,}: generalist stage and covariance pass in "
              f"{time.perf_counter() - started:.0f} s")
    ratios = {}
    for command in ("generalist", "covariance"):
        ratio, role = ratio_10x(runs[str(small)][command], runs[str(large)][command])
        ratios[command] = {"ratio": ratio, "role": role}
    return {"classes": supers * per_super, "n": [small * supers * per_super, large * supers * per_super],
            "peaks_bytes": runs, "ratios": ratios,
            "rss_ratio_10x": max(r["ratio"] for r in ratios.values())}


def ddp_phase(data: Path, work: Path, epochs: int) -> dict[str, Any]:
    from orchestration.config import load_config
    from orchestration.ray_train_bench import generalist_throughput

    overrides = ["data.name=packed", f"data.root={data}", "data.options={}", f"generalist.epochs={epochs}",
                 "generalist.patience=100", f"tracking.uri=sqlite:///{work / 'mlflow-ddp.db'}", *GENERALIST]
    config = load_config(None, overrides)
    one = generalist_throughput(config, workers=1, cpus_per_worker=1, run_dir=work / "ddp-1x1")
    two = generalist_throughput(config, workers=2, cpus_per_worker=1, run_dir=work / "ddp-2x1")
    return {"epochs": epochs, "global_batch": 256, "one_worker": one, "two_workers": two,
            "ddp_speedup": two["images_per_s"] / one["images_per_s"]}


def report(result: dict[str, Any], out: Path) -> None:
    mem, ddp, inp = result["memory"], result["ddp"], result["input"]
    print(f"memory, {mem['classes']:,} classes, N = {mem['n'][0]:,} -> {mem['n'][1]:,} training images:")
    for command, ratio in mem["ratios"].items():
        small, large = (mem["peaks_bytes"][k][command] for k in mem["peaks_bytes"])
        roles = ", ".join(f"{r} {small[r] / 2**20:,.0f} -> {large[r] / 2**20:,.0f} MiB"
                          for r in sorted(set(small) & set(large)))
        print(f"  {command}: {roles}; worst ratio {ratio['ratio']:.3f} ({ratio['role']})")
    print(f"data-parallel generalist, global batch {ddp['global_batch']}, {ddp['epochs']} epochs: "
          f"1 x 1 CPU {ddp['one_worker']['images_per_s']:,.0f} img/s (holdout loss "
          f"{ddp['one_worker']['holdout_loss']:.4f}), 2 x 1 CPU {ddp['two_workers']['images_per_s']:,.0f} img/s "
          f"(holdout loss {ddp['two_workers']['holdout_loss']:.4f})")
    print(f"input pipeline, one core: {inp['img_per_s_per_core_32']:,.0f} img/s at 32 px (affine), "
          f"{inp['img_per_s_per_core_224']:,.0f} img/s at 224 px (crop + flip)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    shown = out.relative_to(HERE.parent) if out.is_relative_to(HERE.parent) else out
    print(f"wrote {shown} in {result['wall_seconds']:.0f} s (load {result['environment']['load_average'][0]:.1f})")
    print(f"rss_ratio_10x={mem['rss_ratio_10x']:.3f} ddp_speedup={ddp['ddp_speedup']:.2f} "
          f"input_img_per_s_per_core={inp['img_per_s_per_core_32']:.0f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 classes, N = 5,000 and 50,000 (< 5 min)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="where the packed sets are kept")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    sizes = SIZES["quick" if args.quick else "full"]
    args.data_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="specdistill-scale-"))
    try:
        print("memory as data grows 10x:")
        memory = memory_phase(sizes, args.data_dir, work)
        print("data-parallel generalist:")
        large = pack(args.data_dir, sizes[0], sizes[1], sizes[3])
        ddp = ddp_phase(large, work, epochs=2 if args.quick else 3)
        print("input pipeline:")
        inputs = measure_input(args.quick)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"quick": args.quick, "memory": memory, "ddp": ddp, "input": inputs,
              "environment": {"cpus": os.cpu_count(), "load_average": os.getloadavg(),
                              "machine": platform.machine(), "python": platform.python_version()},
              "wall_seconds": time.perf_counter() - started}
    report(result, args.out)


if __name__ == "__main__":
    main()
