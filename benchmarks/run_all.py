"""Run every benchmark and the end-to-end pipeline; write ``benchmarks/results.json`` and ``BENCHMARKS.md``.

    python -m benchmarks.run_all [--quick] [--seeds 0 1 2] [--config configs/quickstart.yaml]

1. The component benchmarks, each as its own process (``python -m benchmarks.<name>``, with
   ``--quick`` when given): clustering (faiss vs scikit-learn), specialists (parallel speedup
   on Ray), combine (production solver vs the per-example reference; routed inference
   throughput in the full mode), distill (time per KD step from the cache vs plain
   cross-entropy), kd_methods (every distillation method and scheme side by side; its table is
   a section of ``BENCHMARKS.md``), scale (memory as packed data grows 10x, the generalist on 2 Ray
   Train workers against 1, input throughput; its output is a section too). Each prints its figures and a last ``key=value`` line, kept verbatim.
2. The whole pipeline (``specdistill run CONFIG run.seed=S``) once per seed in a fresh run
   directory under ``benchmarks/results/runs/``: wall time, seconds per stage (from the stage
   manifests) and the model table of each run (``RUN/distill/results.json``); accuracy figures
   are reported as mean and standard deviation over the seeds.

Everything lands in ``benchmarks/results.json`` (machine, versions, commands, raw figures) and
``BENCHMARKS.md`` (the same as tables). The README's figures are copied from ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.kd_methods import section_span as kd_section_span
from benchmarks.quality_report import markdown as quality_markdown

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
COMPONENTS = ("clustering", "specialists", "combine", "distill", "kd_methods", "scale")
QUALITY_OUT = HERE / "results" / "quality.json"
STAGES = ("generalist", "clustering", "specialists", "ensemble", "distill")
PACKAGES = ("torch", "torchvision", "ray", "mlflow", "scikit-learn", "faiss-gpu", "faiss-cpu", "numpy")


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        memory = round(pages * size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - a broken CUDA setup only means "no GPU" here
        gpu = None
    return {"cpu": cpu, "cpus": os.cpu_count(), "memory_gib": memory, "gpu": gpu,
            "python": platform.python_version(), "platform": platform.platform(), "versions": versions}


def _key_values(line: str) -> dict[str, float | str]:
    out: dict[str, float | str] = {}
    for part in line.split():
        if "=" in part:
            key, value = part.split("=", 1)
            try:
                out[key] = float(value)
            except ValueError:
                out[key] = value
    return out


def run_component(name: str, quick: bool) -> dict[str, Any]:
    cmd = [sys.executable, "-m", f"benchmarks.{name}", *(["--quick"] if quick else [])]
    shown = f"python -m benchmarks.{name}{' --quick' if quick else ''}"
    print(f"== {shown}", flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    sys.stdout.write(proc.stdout)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    result: dict[str, Any] = {"command": shown, "seconds": round(seconds, 1), "returncode": proc.returncode,
                              "last_line": lines[-1] if lines else "", "output": proc.stdout[-6000:]}
    if proc.returncode != 0:
        sys.stdout.write(proc.stderr[-3000:])
        result["error"] = proc.stderr[-3000:]
    else:
        result["figures"] = _key_values(result["last_line"])
    detail = HERE / "results" / f"{name}.json"
    if detail.exists():
        result["details_file"] = str(detail.relative_to(ROOT))
    return result


def run_pipeline(config: str, seed: int, runs_dir: Path, uri: str, extra: list[str],
                 reuse: bool = False) -> dict[str, Any]:
    run_dir = runs_dir / f"seed{seed}"
    if reuse and (run_dir / "distill" / "manifest.json").exists():
        print(f"== reusing the finished run {run_dir} (seed {seed})", flush=True)
        result = {"command": f"specdistill run {config} run.seed={seed}", "seed": seed, "returncode": 0,
                  "run_dir": str(run_dir), "reused": True}
        _collect(run_dir, result)
        result["seconds"] = round(sum(v or 0 for v in result["stage_seconds"].values()), 1)
        return result
    shutil.rmtree(run_dir, ignore_errors=True)
    specdistill = shutil.which("specdistill", path=str(Path(sys.executable).parent)) or "specdistill"
    cmd = [specdistill, "run", config, f"run.seed={seed}", f"run.dir={run_dir}", f"tracking.uri={uri}", *extra]
    shown = f"specdistill run {config} run.seed={seed}"
    print(f"== {shown}", flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    tail = proc.stdout[-4000:]
    print("\n".join(tail.splitlines()[-12:]), flush=True)
    result: dict[str, Any] = {"command": shown, "seed": seed, "seconds": round(seconds, 1),
                              "returncode": proc.returncode, "run_dir": str(run_dir)}
    if proc.returncode != 0:
        result["error"] = (proc.stderr or proc.stdout)[-3000:]
        return result
    _collect(run_dir, result)
    return result


def _collect(run_dir: Path, result: dict[str, Any]) -> None:
    """Stage seconds, the model table and the ensemble evaluation of a finished run."""
    stages = {}
    for stage in STAGES:
        manifest = run_dir / stage / "manifest.json"
        if manifest.exists():
            stages[stage] = json.loads(manifest.read_text())["metrics"].get("stage_seconds")
    result["stage_seconds"] = stages
    results = run_dir / "distill" / "results.json"
    if results.exists():
        data = json.loads(results.read_text())
        result["models"] = data["rows"] if isinstance(data, dict) else data
    groups = run_dir / "clustering" / "groups.json"
    if groups.exists():
        g = json.loads(groups.read_text())
        sizes = [len(group["classes"]) for group in g["groups"]] or [0]
        result["groups"] = {"n_groups": len(g["groups"]), "num_classes": g["num_classes"], "method": g["method"],
                            "min_size": min(sizes), "max_size": max(sizes), "unassigned": len(g["unassigned"]),
                            "stability_ari": g.get("metrics", {}).get("stability_ari")}
    evaluation = run_dir / "ensemble" / "evaluation.json"
    if evaluation.exists():
        ev = json.loads(evaluation.read_text())
        result["ensemble"] = {k: ev.get(k) for k in ("generalist_top1", "ensemble_top1", "n_covered",
                                                     "covered_generalist_top1", "covered_ensemble_top1")}
        result["table4"] = ev.get("table4")


def _mean_std(values: list[float]) -> dict[str, float]:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if r.get("returncode") == 0]
    models: dict[str, dict[str, list]] = {}
    for run in ok:
        for row in run.get("models", []):
            entry = models.setdefault(row["name"], {"teacher": row.get("teacher", "-"), "top1": [], "top5": [],
                                                    "params": row.get("params"), "latency_ms": []})
            entry["top1"].append(row.get("top1"))
            entry["top5"].append(row.get("top5"))
            entry["latency_ms"].append(row.get("latency_ms"))
    return {
        "n_runs": len(ok),
        "wall_seconds": _mean_std([r["seconds"] for r in ok]),
        "stage_seconds": {s: _mean_std([r["stage_seconds"].get(s) for r in ok]) for s in STAGES},
        "models": {name: {"teacher": e["teacher"], "params": e["params"], "top1": _mean_std(e["top1"]),
                          "top5": _mean_std(e["top5"]), "latency_ms": _mean_std(e["latency_ms"])}
                   for name, e in models.items()},
        "ensemble_gain": _mean_std([r["ensemble"]["ensemble_top1"] - r["ensemble"]["generalist_top1"]
                                    for r in ok if "ensemble" in r]),
    }


def _ms(stat: dict[str, float], fmt: str = ".4f") -> str:
    if not stat or stat.get("n", 0) == 0:
        return "n/a"
    return f"{stat['mean']:{fmt}} ± {stat['std']:{fmt}}"


def kd_methods_section(results: dict[str, Any], previous: dict[str, Any], md: Path) -> str | None:
    """The distillation-methods table: this run's (``benchmarks/results/kd_methods.md``, written by
    ``python -m benchmarks.kd_methods``), else, with ``--merge``, the one kept from before (in the
    previous results.json, or the previous BENCHMARKS.md's section)."""
    fresh = HERE / "results" / "kd_methods.md"
    if results["components"].get("kd_methods", {}).get("returncode") == 0 and fresh.exists():
        return fresh.read_text()
    if not previous:
        return None
    if previous.get("kd_methods_md"):
        return previous["kd_methods_md"]
    text = md.read_text() if md.exists() else ""
    span = kd_section_span(text)
    return None if span is None else text[span[0]:span[1]].rstrip("\n") + "\n"


def markdown(results: dict[str, Any]) -> str:
    """``BENCHMARKS.md``: machine, component benchmarks, the pipeline over seeds, failures."""
    lines = _machine_lines(results) + _component_lines(results["components"]) + _scale_lines(results["components"])
    if results.get("kd_methods_md"):
        lines += ["", results["kd_methods_md"]]
    agg = results.get("pipeline")
    if agg and agg["n_runs"]:
        ok = [r for r in results["pipeline_runs"] if r.get("returncode") == 0]
        lines += _pipeline_lines(results, agg, ok) + _per_seed_lines(agg, ok)
        lines += _report_lines(ok[0]) + _table4_lines(ok[0])
    for r in results.get("pipeline_runs", []):
        if r.get("returncode") != 0:
            lines += ["", f"Pipeline seed {r['seed']} FAILED (exit {r['returncode']}):", "", "```",
                      r.get("error", "")[-1500:], "```"]
    if results.get("quality"):
        lines += quality_markdown(results["quality"])
    return "\n".join(lines + CIFAR_LINES)


def run_quality(reuse: bool, extra: list[str]) -> dict[str, Any]:
    """``python -m benchmarks.quality`` (its own process), and what it wrote."""
    cmd = [sys.executable, "-m", "benchmarks.quality", *(["--reuse"] if reuse else []), *extra]
    print(f"== python -m benchmarks.quality {' '.join(cmd[3:])}".rstrip(), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode != 0 or not QUALITY_OUT.exists():
        return {"returncode": proc.returncode, "base": {}}
    return json.loads(QUALITY_OUT.read_text())


def merge_quality(new: dict[str, Any], previous: dict[str, Any]) -> dict[str, Any]:
    """The quality section of this invocation over the one kept from before, data set by data set:
    a data set measured now replaces its earlier rows, the others keep theirs, and the ablation is
    merged lever by lever (``_merge_ablation``). A failed invocation keeps every earlier row and says it failed."""
    previous = {key: value for key, value in previous.items() if key != "returncode"}
    if not previous:
        return new
    if new.get("returncode"):
        return {**previous, "returncode": new["returncode"]}
    merged = {**previous, **new}
    for key in ("base", "commands"):
        merged[key] = {**previous.get(key, {}), **new.get(key, {})}
    merged["seeds"] = sorted({*previous.get("seeds", []), *new.get("seeds", [])})
    merged.update(_merge_ablation(new, previous))
    return merged


def _merge_ablation(new: dict[str, Any], previous: dict[str, Any]) -> dict[str, Any]:
    """The ablation keys: on the same data set, lever by lever and seed by seed (a lever or seed
    this invocation has no run for keeps the earlier one); on another data set, this invocation's
    ablation if it has any run, else the earlier one."""
    keys = ("ablation_dataset", "ablation", "ablation_seeds")
    old = {k: previous[k] for k in keys if k in previous}
    if "ablation" not in new:
        return old
    fresh = {k: new[k] for k in keys if k in new}
    has_runs = any(new["ablation"].values())
    if not old.get("ablation") or new.get("ablation_dataset") != old.get("ablation_dataset"):
        return fresh if has_runs or not old else old
    levers: dict[str, list] = {}
    for lever in {**old["ablation"], **new["ablation"]}:
        by_seed = {r["seed"]: r for r in old["ablation"].get(lever, [])}
        by_seed.update({r["seed"]: r for r in new["ablation"].get(lever, [])})
        levers[lever] = [by_seed[seed] for seed in sorted(by_seed)]
    seeds = sorted({r["seed"] for runs in levers.values() for r in runs})
    return {"ablation_dataset": old["ablation_dataset"], "ablation": levers, "ablation_seeds": seeds}


def _machine_lines(results: dict[str, Any]) -> list[str]:
    m = results["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    return [
        "# Benchmarks", "",
        f"Generated by `{results['command']}` on {results['date']}. Do not edit by hand: re-run the "
        "command.", "",
        "## Machine", "",
        f"- CPU: {m['cpu']}, {m['cpus']} cores, {m['memory_gib']} GiB memory; GPU: {m['gpu'] or 'none'}",
        f"- Python {m['python']} on {m['platform']}",
        f"- {versions}", "",
        "The machine is shared with other jobs: compare ratios measured within one run, not absolute times "
        "across runs.", "",
    ]


def _component_lines(components: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["## Component benchmarks", "",
             "| benchmark | command | seconds | result (last line) |", "|---|---|---:|---|"]
    for name, comp in components.items():
        last = comp["last_line"] if comp["returncode"] == 0 else f"FAILED (exit {comp['returncode']})"
        lines.append(f"| {name} | `{comp['command']}` | {comp['seconds']:.0f} | `{last}` |")
    return lines


def _scale_lines(components: dict[str, dict[str, Any]]) -> list[str]:
    """What ``benchmarks.scale`` printed (memory per process as data grows, data-parallel scaling,
    input throughput), without the Ray workers' own log lines."""
    scale = components.get("scale")
    if not scale or scale["returncode"] != 0:
        return []
    shown = [line for line in scale["output"].splitlines()
             if line.strip() and not line.lstrip().startswith(("(", "\x1b[")) and "INFO" not in line]
    return ["", f"## Scale (`{scale['command']}`)", "",
            "Goals: `rss_ratio_10x <= 1.3` (peak memory of every process flat as the data grows 10x), "
            "`ddp_speedup >= 1.6` (2 Ray Train workers x 1 CPU against 1 x 1 CPU, same global batch).", "",
            "```", *shown, "```"]


def _pipeline_lines(results: dict[str, Any], agg: dict[str, Any], ok: list[dict[str, Any]]) -> list[str]:
    """Stage seconds and the model table, mean ± std over the seeds."""
    seeds = ", ".join(str(r["seed"]) for r in ok)
    reused = any(r.get("reused") for r in results["pipeline_runs"])
    lines = ["", f"## End to end on glyphs (`{results['pipeline_command']}`, seeds {seeds})", "",
             f"Whole pipeline: {_ms(agg['wall_seconds'], '.0f')} s "
             + ("(sum of the stage times of runs made earlier and reused)" if reused
                else "wall (including start-up)")
             + ".", "",
             "| stage | seconds (mean ± std) |", "|---|---:|"]
    lines += [f"| {s} | {_ms(agg['stage_seconds'][s], '.1f')} |" for s in STAGES]
    lines += ["", f"Accuracy on the test split, mean ± std over {agg['n_runs']} seeds:", "",
              MODEL_HEADER, MODEL_RULE]
    for name, e in agg["models"].items():
        params = f"{e['params']:,}" if isinstance(e["params"], int) else "n/a"
        lines.append(f"| {name} | {e['teacher']} | {_ms(e['top1'])} | {_ms(e['top5'])} | {params} | "
                     f"{_ms(e['latency_ms'], '.3f')} |")
    return lines + ["", f"Ensemble minus generalist test top-1: {_ms(agg['ensemble_gain'])}.", ""]


def _per_seed_lines(agg: dict[str, Any], ok: list[dict[str, Any]]) -> list[str]:
    names = list(agg["models"])
    lines = ["Per seed (whole pipeline seconds, groups found with their stability ARI, test top-1 of each model):",
             "", "| seed | seconds | groups (ARI) | " + " | ".join(names) + " |",
             "|---:|---:|---:|" + "---:|" * len(names)]
    for r in ok:
        top1 = {row["name"]: row.get("top1") for row in r.get("models", [])}
        cells = ["n/a" if top1.get(n) is None else f"{top1[n]:.4f}" for n in names]
        g = r.get("groups")
        grouped = f"{g['n_groups']} ({_ari(g)})" if g else "n/a"
        lines.append(f"| {r['seed']} | {r['seconds']:.0f} | {grouped} | " + " | ".join(cells) + " |")
    return lines


def _report_lines(first: dict[str, Any]) -> list[str]:
    """The results report of the first seed's run (its model rows and groups)."""
    if not first.get("models"):
        return []
    lines = ["", f"The results report of seed {first['seed']} (what `specdistill run` prints at the end):", "",
             MODEL_HEADER, MODEL_RULE]
    for row in first["models"]:
        params = f"{row['params']:,}" if isinstance(row.get("params"), int) else "n/a"
        latency = "n/a" if row.get("latency_ms") is None else f"{row['latency_ms']:.3f}"
        lines.append(f"| {row['name']} | {row.get('teacher', '-')} | {row.get('top1', float('nan')):.4f} | "
                     f"{row.get('top5', float('nan')):.4f} | {params} | {latency} |")
    g = first.get("groups")
    if g:
        lines += ["", f"groups: {g['n_groups']} of {g['num_classes']} classes ({g['method']}), sizes "
                  f"{g['min_size']}-{g['max_size']}, {g['unassigned']} unassigned, stability ARI {_ari(g)}"]
    return lines + [""]


def _table4_lines(first: dict[str, Any]) -> list[str]:
    if not first.get("table4"):
        return []
    lines = [f"Table 4 (seed {first['seed']}):", "",
             "| # specialists covering | # test examples | delta top-1 correct | relative accuracy change |",
             "|---:|---:|---:|---:|"]
    for r in first["table4"]:
        rel = r["relative_accuracy_change"]
        lines.append(f"| {r['specialists_covering']} | {r['n_examples']:,} | {r['delta_correct']:+d} | "
                     f"{'n/a' if rel is None else f'{rel:+.1%}'} |")
    return lines


def _ari(groups: dict[str, Any]) -> str:
    return "n/a" if groups.get("stability_ari") is None else f"{groups['stability_ari']:.3f}"


MODEL_HEADER = "| model | teacher | test top-1 | test top-5 | parameters | latency ms/example |"
MODEL_RULE = "|---|---|---:|---:|---:|---:|"
CIFAR_LINES = [
    "", "## The same on CIFAR-100 with a GPU", "",
    "CIFAR-100 is read from a local copy (nothing is downloaded at run time): put the python "
    "version (`cifar-100-python/`) under a folder and point `data.root` at it.", "",
    "```bash",
    "specdistill run configs/cifar100.yaml data.root=/data/cifar run.device=cuda \\",
    "    specialists.gpus_per_specialist=0.25 ensemble.cache.gpus_per_actor=0.25",
    "python -m benchmarks.run_all --config configs/cifar100.yaml --seeds 0 1 2 -- data.root=/data/cifar run.device=cuda",
    "```", "",
    "Fractional `gpus_per_specialist` packs several specialists on one GPU; on a Ray cluster see "
    "`docs/cluster.md`.", "",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="component benchmarks in --quick mode")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="pipeline seeds (none: skip)")
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--only", nargs="*", choices=COMPONENTS, default=list(COMPONENTS),
                        help="component benchmarks to run (default: all)")
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    parser.add_argument("--md", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--reuse", action="store_true",
                        help="take a seed's finished run directory from an earlier run_all as it is "
                             "(its time = the sum of its stage times) instead of running it again")
    parser.add_argument("--merge", action="store_true",
                        help="keep what an earlier results.json has for the parts not re-run now "
                             "(e.g. re-run one benchmark: --only specialists --seeds --merge)")
    parser.add_argument("--quality", action="store_true",
                        help="also run the quality benchmark (python -m benchmarks.quality: 4 data sets x 3 seeds "
                             "and the ablation; hours on 2 cores)")
    parser.add_argument("--quality-args", nargs="*", default=[],
                        help="arguments for benchmarks.quality in one quoted string, split as a shell would: "
                             "--quality-args='--datasets omniglot-5 --seeds 0'")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for the pipeline runs (after --)")
    args = parser.parse_args(argv)
    try:
        args.quality_args = [word for value in args.quality_args for word in shlex.split(value)]
    except ValueError as err:  # unbalanced quotes
        parser.error(f"--quality-args {' '.join(args.quality_args)!r}: {err}; quote it as one string, "
                     "e.g. --quality-args='--datasets omniglot-5 --seeds 0'")
    started = time.perf_counter()
    command = "python -m benchmarks.run_all" + (" --quick" if args.quick else "") + \
        (f" --only {' '.join(args.only)}".rstrip() if args.only != list(COMPONENTS) else "") + \
        (f" --seeds {' '.join(map(str, args.seeds))}".rstrip() if args.seeds != [0, 1, 2] else "") + \
        (" --merge" if args.merge else "") + (" --reuse" if args.reuse else "") + \
        (" --quality" if args.quality else "") + \
        (f" --quality-args={' '.join(args.quality_args)}" if args.quality and args.quality_args else "")
    results: dict[str, Any] = {"command": command, "date": dt.date.today().isoformat(), "machine": machine(),
                               "components": {}, "pipeline_runs": []}
    for name in args.only:
        results["components"][name] = run_component(name, args.quick)
    runs_dir = HERE / "results" / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{runs_dir / 'mlflow.db'}"
    for seed in args.seeds:
        results["pipeline_runs"].append(run_pipeline(args.config, seed, runs_dir, uri, args.overrides,
                                                     reuse=args.reuse))
    results["pipeline_command"] = f"specdistill run {args.config} run.seed=S"
    if args.quality:
        results["quality"] = run_quality(args.reuse, args.quality_args)
    previous: dict[str, Any] = {}
    if args.merge and args.out.exists():
        previous = json.loads(args.out.read_text())
        results["components"] = {**previous.get("components", {}), **results["components"]}
        if not args.seeds:
            results["pipeline_runs"] = previous.get("pipeline_runs", [])
            results["pipeline_command"] = previous.get("pipeline_command", results["pipeline_command"])
        if previous.get("quality"):
            results["quality"] = merge_quality(results["quality"], previous["quality"]) if args.quality \
                else previous["quality"]
        results["command"] = f"{previous['command']}`, then `{command}" if previous.get("command") else command
    results["kd_methods_md"] = kd_methods_section(results, previous if args.merge and args.out.exists() else {},
                                                  args.md)
    results["pipeline"] = aggregate(results["pipeline_runs"])
    results["wall_seconds"] = time.perf_counter() - started
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    args.md.write_text(markdown(results))
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out} and "
          f"{args.md.name} in {results['wall_seconds'] / 60:.1f} min")
    failed = [n for n, c in results["components"].items() if c["returncode"] != 0] + \
        [f"seed {r['seed']}" for r in results["pipeline_runs"] if r["returncode"] != 0] + \
        (["quality"] if args.quality and results["quality"].get("returncode") else [])
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
