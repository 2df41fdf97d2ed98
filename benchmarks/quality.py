"""Does the specialist ensemble pay off, honestly? Figures on several data sets over seeds.

    python -m benchmarks.quality [--datasets glyphs omniglot-5 ...] [--seeds 0 1 2] [--reuse]
    python -m benchmarks.quality --summary          # one line per data set from results.json

``--threads 1`` gives every run one torch thread (two invocations on different data sets or seeds
can then share a 2-core machine); ``--collect`` then gathers every finished run into one results
file without training anything.

For every data set and seed it runs the whole pipeline (``specdistill run CONFIG ...`` in its own
run directory under ``benchmarks/results/quality/``) and collects, from what the stages wrote:
the converged generalist (and whether it converged), the same-compute generalist (trained on for
as many examples as the specialists saw), the ensemble and its Table 4, the grouping quality
(share of holdout confusion mass inside groups, and its ratio to random groups of the same
sizes), the student distilled from the ensemble, the one distilled from the generalist alone,
the hard-label student and the data-free one. Then the ablation: each lever of the method
switched off in turn (on a copy of each base run, so only the stages downstream of the lever
run again).

Results go to ``benchmarks/results/quality.json`` and, through ``benchmarks.run_all``, to
``benchmarks/results.json`` and BENCHMARKS.md. ``omniglot-5`` needs the data at
``--omniglot`` (default ``../shared/data/omniglot-5`` from the repository root); it is skipped
with a note when absent.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "results" / "quality.json"
RUNS = HERE / "results" / "quality"
OMNIGLOT = ROOT.parent / "shared" / "data" / "omniglot-5"
HELD_OUT_FONTS = "[DejaVuSans-BoldOblique, DejaVuSerif-Italic, STIXGeneralBol]"


def datasets(omniglot: Path) -> dict[str, tuple[str, list[str]]]:
    """Data set name -> (config file, overrides)."""
    return {
        "glyphs": ("configs/quickstart.yaml", []),
        "glyphs-full": ("configs/full.yaml", []),
        "glyphs-heldout-fonts": ("configs/quickstart.yaml", [f"data.options.test_fonts={HELD_OUT_FONTS}"]),
        "omniglot-5": ("configs/full.yaml", [
            "data.name=image_folder", f"data.root={omniglot}",
            r"data.options={image_size: 32, channels: 1, holdout_fraction: 0.2, source_pattern: '_(\d+)\.png$'}",
        ]),
    }


def commands(names: list[str], omniglot: Path) -> dict[str, str]:
    """Data set name -> the ``specdistill run`` command of its seed-S run."""
    table = datasets(omniglot)
    return {name: " ".join(["specdistill run", table[name][0], *table[name][1], "run.seed=S"]) for name in names}


# Each lever of the method, and the overrides that switch it off.
ABLATIONS = {
    "groups from covariance columns (not confusions)": ["clustering.affinity=covariance"],
    "disjoint groups, top-1 routing": ["clustering.overlap=0", "ensemble.top_n=1"],
    "generalist without its clean epochs": ["generalist.clean_epochs=0"],
    "specialists with augmentation": ["specialists.augment=true"],
    "students from cached fixed views": ["distill.targets=cache"],
    "students without augmentation": ["distill.augment=false"],
}


# ----------------------------------------------------------------------------- running
def _specdistill() -> str:
    return shutil.which("specdistill", path=str(Path(sys.executable).parent)) or "specdistill"


# Overrides every run of this invocation gets (``--threads``).
COMMON: list[str] = []


def run_once(config: str, overrides: list[str], run_dir: Path, uri: str, *, fresh: bool) -> dict[str, Any]:
    """``specdistill run`` into ``run_dir``; the figures it wrote, or the error."""
    if fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [_specdistill(), "run", config, *overrides, *COMMON, f"run.dir={run_dir}", f"tracking.uri={uri}",
           "distill.register_model=false"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = round(time.perf_counter() - started, 1)
    shown = " ".join(["specdistill run", config, *overrides])
    if proc.returncode != 0:
        return {"command": shown, "returncode": proc.returncode, "seconds": seconds,
                "error": (proc.stderr or proc.stdout)[-3000:]}
    return {"command": shown, "returncode": 0, "seconds": seconds, **collect(run_dir)}


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def collect(run_dir: Path) -> dict[str, Any]:
    """The figures of a finished run, from the files its stages wrote."""
    generalist = _read(run_dir / "generalist" / "metrics.json") or {}
    evaluation = _read(run_dir / "ensemble" / "evaluation.json") or {}
    groups = (_read(run_dir / "clustering" / "groups.json") or {}).get("metrics", {})
    results = _read(run_dir / "distill" / "results.json") or {"rows": []}
    same = (_read(run_dir / "specialists" / "same_compute" / "model.json") or {}).get("same_compute", {})
    rows = {r["name"]: r for r in results["rows"]}
    top1 = {name: row.get("top1") for name, row in rows.items()}
    return {
        "generalist_top1": evaluation.get("generalist_top1", generalist.get("test_top1")),
        "generalist_converged": bool(generalist.get("early_stopped")),
        "generalist_epochs": generalist.get("epochs_trained"),
        "same_compute_top1": evaluation.get("same_compute_top1"),
        "same_compute_recipe": same.get("recipe", "specialists") if same else None,
        "ensemble_top1": evaluation.get("ensemble_top1"),
        "table4": evaluation.get("table4", []),
        "mean_covering_specialists": evaluation.get("mean_covering_specialists"),
        "n_specialists": evaluation.get("n_specialists"),
        "captured_share": groups.get("captured_share"),
        "random_share": groups.get("random_share"),
        "grouping_ratio": groups.get("ratio_to_random"),
        "students": top1,
        "params": {name: row.get("params") for name, row in rows.items()},
    }


def base_runs(names: list[str], seeds: list[int], omniglot: Path, uri: str, reuse: bool,
              collect_only: bool = False) -> dict[str, list]:
    table = datasets(omniglot)
    out: dict[str, list] = {}
    for name in names:
        config, overrides = table[name]
        if name == "omniglot-5" and not omniglot.is_dir():
            print(f"== skip {name}: no data at {omniglot} (pass --omniglot PATH)", flush=True)
            continue
        out[name] = []
        for seed in seeds:
            run_dir = RUNS / name / f"seed{seed}"
            print(f"== {name} seed {seed}", flush=True)
            done = (reuse or collect_only) and (run_dir / "distill" / "manifest.json").exists()
            if collect_only and not done:
                print(f"   no finished run in {run_dir}: left out", flush=True)
                continue
            result = ({"command": f"(reused) {run_dir}", "returncode": 0, "seconds": None, **collect(run_dir)}
                      if done else run_once(config, [*overrides, f"run.seed={seed}"], run_dir, uri, fresh=True))
            out[name].append({"seed": seed, **result})
            print("   " + summary_line(name, [out[name][-1]]), flush=True)
    return out


def ablation_runs(name: str, seeds: list[int], omniglot: Path, uri: str, reuse: bool,
                  collect_only: bool = False) -> dict[str, list]:
    """Each lever switched off, on a copy of each seed's base run (only later stages re-run)."""
    config, overrides = datasets(omniglot)[name]
    out: dict[str, list] = {}
    for lever, off in ABLATIONS.items():
        out[lever] = []
        for seed in seeds:
            base = RUNS / name / f"seed{seed}"
            run_dir = RUNS / f"{name}-ablation" / _slug(lever) / f"seed{seed}"
            print(f"== ablation {lever!r} ({name} seed {seed})", flush=True)
            if (reuse or collect_only) and (run_dir / "distill" / "manifest.json").exists():
                out[lever].append({"seed": seed, **collect(run_dir)})
                continue
            if collect_only:
                print(f"   no finished run in {run_dir}: left out", flush=True)
                continue
            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.copytree(base, run_dir)
            result = run_once(config, [*overrides, f"run.seed={seed}", *off], run_dir, uri, fresh=False)
            out[lever].append({"seed": seed, **result})
    return out


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")[:60]


# ----------------------------------------------------------------------------- figures
def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _std(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.stdev(values) if len(values) > 1 else None


def per_run(run: dict[str, Any]) -> dict[str, float | None]:
    """The derived figures of one run (None where a stage did not write its input)."""
    gen, ens, same = run.get("generalist_top1"), run.get("ensemble_top1"), run.get("same_compute_top1")
    s = run.get("students", {})
    student, from_gen, hard = s.get("student"), s.get("generalist_kd"), s.get("hard_labels")
    kept = None
    if None not in (student, hard, ens) and ens > hard:
        kept = (student - hard) / (ens - hard)
    return {
        "ensemble_rel_gain": ens / gen - 1 if None not in (ens, gen) else None,
        "ensemble_err_reduction": 1 - (1 - ens) / (1 - gen) if None not in (ens, gen) and gen < 1 else None,
        "same_compute_rel_gain": ens / same - 1 if None not in (ens, same) else None,
        "grouping_ratio": run.get("grouping_ratio"),
        "student_minus_generalist": student - gen if None not in (student, gen) else None,
        "student_ens_minus_gen": student - from_gen if None not in (student, from_gen) else None,
        "student_gain_kept": kept,
    }


SUMMARY_KEYS = ("ensemble_rel_gain", "ensemble_err_reduction", "same_compute_rel_gain", "grouping_ratio",
                "student_minus_generalist", "student_ens_minus_gen")


def aggregate(runs: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Mean and std over seeds of the raw and derived figures."""
    ok = [r for r in runs if r.get("returncode", 0) == 0]
    derived = [per_run(r) for r in ok]
    figures: dict[str, list] = {k: [d[k] for d in derived] for k in derived[0]} if derived else {}
    for key in ("generalist_top1", "same_compute_top1", "ensemble_top1", "captured_share", "random_share",
                "mean_covering_specialists"):
        figures[key] = [r.get(key) for r in ok]
    for name in ("student", "generalist_kd", "hard_labels", "data_free"):
        figures[f"{name}_top1"] = [r.get("students", {}).get(name) for r in ok]
    return {k: {"mean": _mean(v), "std": _std(v)} for k, v in figures.items()}


def summary_line(name: str, runs: list[dict[str, Any]]) -> str:
    agg = aggregate(runs)
    parts = [f"dataset={name}", f"seeds={sum(1 for r in runs if r.get('returncode', 0) == 0)}"]
    for key in SUMMARY_KEYS:
        value = agg.get(key, {}).get("mean")
        parts.append(f"{key}={'nan' if value is None else format(value, '.3f' if key != 'grouping_ratio' else '.1f')}")
    return " ".join(parts)


def table4_by_coverage(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Table 4 summed over seeds: examples and relative accuracy change per coverage."""
    acc: dict[int, list[int]] = {}
    for run in runs:
        for row in run.get("table4", []):
            entry = acc.setdefault(row["specialists_covering"], [0, 0, 0, 0])
            entry[0] += row["n_examples"]
            entry[1] += row["generalist_correct"]
            entry[2] += row["ensemble_correct"]
            entry[3] += row.get("same_compute_correct", 0)
    return [{"specialists_covering": k, "n_examples": n, "relative_vs_generalist": (e - g) / g if g else None,
             "relative_vs_same_compute": (e - s) / s if s else None}
            for k, (n, g, e, s) in sorted(acc.items())]


def print_summary(results_path: Path) -> int:
    """One line per data set (means over seeds) from ``results.json``; 1 when there is none."""
    quality = json.loads(results_path.read_text()).get("quality") if results_path.exists() else None
    if not quality or not quality.get("base"):
        print(f"no quality results in {results_path}; run `python -m benchmarks.run_all --only quality`")
        return 1
    for name, runs in quality["base"].items():
        print(summary_line(name, runs))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(datasets(OMNIGLOT)))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--ablation", default="omniglot-5", help="data set of the ablation ('' = none)")
    parser.add_argument("--ablation-seeds", nargs="+", type=int, help="seeds of the ablation (default --seeds)")
    parser.add_argument("--threads", type=int, help="torch threads per run (run.num_threads)")
    parser.add_argument("--omniglot", type=Path, default=OMNIGLOT)
    parser.add_argument("--reuse", action="store_true", help="keep finished runs of an earlier invocation")
    parser.add_argument("--collect", action="store_true",
                        help="train nothing: gather the finished runs of earlier invocations, leave out the rest")
    parser.add_argument("--summary", action="store_true", help="print the summary of results.json only")
    ns = parser.parse_args(argv)
    if ns.summary:
        return print_summary(HERE / "results.json")
    if ns.threads:
        COMMON.append(f"run.num_threads={ns.threads}")
    uri = f"sqlite:///{RUNS / 'mlflow.db'}"
    RUNS.mkdir(parents=True, exist_ok=True)
    results = {"seeds": ns.seeds, "base": base_runs(ns.datasets, ns.seeds, ns.omniglot, uri, ns.reuse, ns.collect),
               "commands": commands(ns.datasets, ns.omniglot)}
    if ns.ablation and ns.ablation in results["base"]:
        results["ablation_dataset"] = ns.ablation
        results["ablation"] = ablation_runs(ns.ablation, ns.ablation_seeds or ns.seeds, ns.omniglot, uri, ns.reuse,
                                            ns.collect)
        results["ablation_seeds"] = sorted({r["seed"] for runs in results["ablation"].values() for r in runs})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    for name, runs in results["base"].items():
        print(summary_line(name, runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
