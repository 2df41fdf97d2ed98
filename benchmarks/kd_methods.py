"""Benchmark: every distillation method and training scheme side by side, on glyphs and omniglot-5.

    python -m benchmarks.kd_methods [--quick] [--seeds 0 1 2] [--datasets glyphs omniglot5] [--reuse]

For each data set and seed the teacher pipeline runs once, ``specdistill run ... --to ensemble``
with the small fixed recipe of ``DATASETS`` (a subprocess, in ``benchmarks/results/kd_runs/``).
Then every method of ``METHODS`` runs as the distill stage, ``specdistill distill`` with its
overrides (through ``orchestration.cli.main`` in this process), each in its own run directory
copied from the teacher run: the same student (``cnn_fast`` at width 0.5), budget
(``distill.epochs``, batch 64, AdamW), seed and teacher (the run's ensemble, from its soft-target
cache). Methods follow RepDistiller's protocol: each is cross-entropy plus ``weight * term``
(``distill.alpha = 0``), with the weight of RepDistiller's CIFAR-100 scripts where our formula is
theirs, else one that puts the term near the cross-entropy's size at the start; KD is
``alpha = 0.9, T = 4``. Schemes report their last model (``mutual_1``, ``born_again_<G>``,
``assistant_student``). Accuracy is test top-1, mean ± std over the seeds.

The training cost per step of each method relative to plain KD is timed in one process, side by
side (``benchmarks.kd_methods_steps``), on seed 0's teacher of each data set; the same module
trains one student with torchdistill's KD loss and one with ours (same start, same batches) when
torchdistill is installed (``pip install -c constraints.txt -e '.[bench]'``).

Writes ``benchmarks/results/kd_methods.json`` (every row of every run, the commands, the timing),
``benchmarks/results/kd_methods.md`` and its section of ``BENCHMARKS.md`` (``benchmarks.run_all``
includes the same section). ``--quick`` (about 20 minutes on 2 idle cores): 20 glyph classes, about 150 student steps;
without it: 100 glyph classes, longer training.
"""

from __future__ import annotations

import argparse
import contextlib
import io
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
RUNS = HERE / "results" / "kd_runs"
OUT_JSON, OUT_MD = HERE / "results" / "kd_methods.json", HERE / "results" / "kd_methods.md"
SECTION = "## Distillation methods side by side"
OMNIGLOT = ROOT.parent / "shared" / "data" / "omniglot-5"

# data set -> mode -> teacher-pipeline overrides (data, generalist, clustering, specialists)
DATASETS: dict[str, dict[str, tuple[str, ...]]] = {
    "glyphs": {
        "quick": ("data.options={num_classes: 20, train_per_class: 40, holdout_per_class: 10, test_per_class: 15}",
                  "generalist.epochs=10", "generalist.batch_size=64", "clustering.n_groups=4",
                  "specialists.epochs=2"),
        "full": ("data.options={num_classes: 100, train_per_class: 60, holdout_per_class: 12, test_per_class: 15}",
                 "generalist.epochs=12", "generalist.batch_size=64", "clustering.n_groups=10",
                 "specialists.epochs=3"),
    },
    "omniglot5": {
        "quick": ("data.name=image_folder", f"data.root={OMNIGLOT}", "data.options={image_size: 32, channels: 1}",
                  "generalist.epochs=12", "generalist.batch_size=64", "clustering.n_groups=8",
                  "specialists.epochs=2"),
        "full": ("data.name=image_folder", f"data.root={OMNIGLOT}", "data.options={image_size: 32, channels: 1}",
                 "generalist.epochs=20", "generalist.batch_size=64", "clustering.n_groups=12",
                 "specialists.epochs=3"),
    },
}
TEACHER = ("run.device=cpu", "run.num_threads=1", "ray.local_num_cpus=2", "clustering.method=spectral",
           "clustering.stability_seeds=0")
# data set -> mode -> the students' epochs (at batch 64: about 150 steps in the quick mode)
EPOCHS = {"glyphs": {"quick": 12, "full": 15}, "omniglot5": {"quick": 5, "full": 20}}
STUDENT = ("distill.student=cnn_fast", "distill.width=0.5", "distill.batch_size=64", "distill.temperature=4.0",
           "distill.baselines=false", "distill.data_free.enabled=false", "distill.register_model=false")
CE_PLUS = "distill.alpha=0.0"     # RepDistiller's protocol: cross-entropy + weight * term
# method -> (its overrides, the result row that is the method's student, what it is)
METHODS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "kd": (("distill.alpha=0.9", "distill.baselines=true"), "student", "Hinton KD, alpha 0.9, T 4"),
    "dkd": ((CE_PLUS, "distill.losses={dkd: 1.0}", "distill.loss_options={dkd: {alpha: 1.0, beta: 8.0, temperature: 4.0}}"),
            "student", "DKD alpha 1, beta 8, T 4 (mdistiller CIFAR-100)"),
    "dist": ((CE_PLUS, "distill.losses={dist: 1.0}", "distill.loss_options={dist: {beta: 2.0, gamma: 2.0, temperature: 4.0}}"),
             "student", "DIST beta 2, gamma 2, T 4 (paper, CIFAR-100)"),
    "hint": ((CE_PLUS, "distill.losses={hint: 100.0}", "distill.hint_layers=[blocks.1, blocks.1]"),
             "student", "FitNets hint at blocks.1, weight 100 (RepDistiller)"),
    "attention": ((CE_PLUS, "distill.losses={attention: 1.0}", "distill.hint_layers=[blocks.2, blocks.2]"),
                  "student", "attention transfer at blocks.2, weight 1"),
    "fsp": ((CE_PLUS, "distill.losses={fsp: 50.0}",
             "distill.layers={fsp: [[blocks.1, blocks.0], [blocks.2, blocks.1]]}"),
            "student", "FSP, student blocks 1-2 vs teacher blocks 0-1, weight 50 (RepDistiller)"),
    "nst": ((CE_PLUS, "distill.losses={nst: 50.0}", "distill.layers={nst: [blocks.2, blocks.2]}"),
            "student", "NST at blocks.2, weight 50 (RepDistiller)"),
    "ft": ((CE_PLUS, "distill.losses={ft: 200.0}", "distill.layers={ft: [blocks.2, blocks.2]}",
            "distill.loss_options={ft: {paraphraser_epochs: 2}}"),
           "student", "factor transfer at blocks.2 (paraphraser 2 epochs first), weight 200"),
    "ab": ((CE_PLUS, "distill.losses={ab: 0.003}", "distill.layers={ab: [blocks.2, blocks.2]}"),
           "student", "activation boundaries at blocks.2, weight 3/1000 (RepDistiller)"),
    "rkd": ((CE_PLUS, "distill.losses={rkd: 1.0}"), "student", "RKD distance 25 + angle 50, pooled (RepDistiller)"),
    "similarity": ((CE_PLUS, "distill.losses={similarity: 3000.0}"), "student",
                   "similarity-preserving, pooled, weight 3000 (RepDistiller)"),
    "pkt": ((CE_PLUS, "distill.losses={pkt: 30000.0}"), "student", "PKT, pooled, weight 30000 (RepDistiller)"),
    "cc": ((CE_PLUS, "distill.losses={cc: 10.0}"), "student", "CC gaussian (gamma 0.4, order 2), pooled, weight 10"),
    "irg": ((CE_PLUS, "distill.losses={irg: 0.1}"), "student", "IRG vertex + edge on the logits, weight 0.1"),
    "crd": ((CE_PLUS, "distill.losses={crd: 0.8}"), "student",
            "CRD, bank = training set, <= 4096 negatives, weight 0.8 (RepDistiller)"),
    "mutual": (("distill.scheme=mutual", "distill.schemes.group_size=2"), "mutual_1",
               "deep mutual learning, 2 students, no teacher"),
    "born_again": (("distill.alpha=0.9", "distill.scheme=born_again", "distill.schemes.generations=2"),
                   "born_again_2", "born-again, 2 generations of the generalist's architecture"),
    "teacher_assistant": (("distill.alpha=0.9", "distill.scheme=teacher_assistant"), "assistant_student",
                          "teacher assistant at width 0.75, then the student"),
}
REFERENCE_ROWS = ("generalist", "ensemble", "hard_labels", "generalist_kd")


def teacher_run(dataset: str, seed: int, mode: str, uri: str, reuse: bool) -> dict[str, Any]:
    """The teacher pipeline of one data set and seed (``--to ensemble``), or the finished one kept."""
    run = RUNS / mode / dataset / f"seed{seed}" / "teacher"
    overrides = [*TEACHER, *DATASETS[dataset][mode], f"run.seed={seed}"]
    command = "specdistill run " + " ".join(overrides) + " --to ensemble"
    if reuse and (run / "ensemble" / "manifest.json").exists():
        return {"command": command, "run": str(run), "seconds": None, "reused": True}
    shutil.rmtree(run, ignore_errors=True)
    specdistill = shutil.which("specdistill", path=str(Path(sys.executable).parent)) or "specdistill"
    started = time.perf_counter()
    proc = subprocess.run([specdistill, "run", *overrides, f"run.dir={run}", f"tracking.uri={uri}",
                           "--to", "ensemble"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{command} failed (exit {proc.returncode}):\n{proc.stderr[-3000:] or proc.stdout[-3000:]}")
    return {"command": command, "run": str(run), "seconds": round(time.perf_counter() - started, 1)}


def method_run(teacher: Path, method: str, epochs: int, uri: str, reuse: bool) -> dict[str, Any]:
    """``specdistill distill`` for one method in a copy of the teacher run; its result rows."""
    from orchestration.cli import main

    run = teacher.parent / method
    overrides = [*STUDENT, f"distill.epochs={epochs}", *METHODS[method][0]]
    results = run / "distill" / "results.json"
    if not (reuse and results.exists()):
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(teacher, run, ignore=shutil.ignore_patterns("distill"))
        # the teacher run's resolved config, so the stage sees the same data and upstream settings
        args = ["distill", str(teacher / "config.yaml"), *overrides, f"run.dir={run}", f"tracking.uri={uri}"]
        log = io.StringIO()
        started = time.perf_counter()
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            code = main(args)
        (run / "distill.log").write_text(log.getvalue())
        if code != 0:
            raise RuntimeError(f"specdistill distill for {method} failed (exit {code}):\n{log.getvalue()[-3000:]}")
        print(f"    {method}: {time.perf_counter() - started:.0f} s", flush=True)
    rows = json.loads(results.read_text())["rows"]
    return {"overrides": overrides, "rows": {r["name"]: r for r in rows}}


def run_dataset(dataset: str, seeds: list[int], mode: str, methods: list[str], reuse: bool) -> dict[str, Any]:
    uri = f"sqlite:///{RUNS / mode / 'mlflow.db'}"
    out: dict[str, Any] = {"seeds": {}, "epochs": EPOCHS[dataset][mode]}
    for seed in seeds:
        print(f"== {dataset} seed {seed}: teacher pipeline", flush=True)
        teacher = teacher_run(dataset, seed, mode, uri, reuse)
        runs = {m: method_run(Path(teacher["run"]), m, EPOCHS[dataset][mode], uri, reuse) for m in methods}
        out["seeds"][seed] = {"teacher": teacher, "methods": runs}
    return out


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarise(result: dict[str, Any], methods: list[str]) -> dict[str, Any]:
    """Per method: top-1 mean ± std over seeds of its student row, parameters; reference rows."""
    seeds = list(result["seeds"].values())
    table: dict[str, Any] = {}
    kd_runs = [s["methods"]["kd"]["rows"] for s in seeds if "kd" in s["methods"]]
    for name in REFERENCE_ROWS:
        values = [rows[name]["top1"] for rows in kd_runs if name in rows]
        if values:
            table[name] = {"top1": _mean_std(values), "params": kd_runs[0][name]["params"],
                           "what": kd_runs[0][name]["teacher"]}
    for method in methods:
        row_name = METHODS[method][1]
        rows = [s["methods"][method]["rows"][row_name] for s in seeds]
        table[method] = {"top1": _mean_std([r["top1"] for r in rows]), "params": rows[0]["params"],
                         "what": METHODS[method][2], "row": row_name}
    return table


def markdown(results: dict[str, Any]) -> str:
    minutes = f"{results['wall_seconds'] / 60:.0f} min"
    if "runs_wall_seconds" in results:
        minutes = (f"{results['runs_wall_seconds'] / 60:.0f} min for the runs, re-read here with --reuse in "
                   f"{results['wall_seconds'] / 60:.0f} min")
    lines = [SECTION, "",
             f"`{results['command']}` ({results['mode']}, seeds {', '.join(map(str, results['seeds']))}, "
             f"{minutes}). Same student (cnn_fast width 0.5), budget "
             "(the data set's epochs, batch 64, AdamW 0.003) and teacher (the run's ensemble, cached "
             "soft targets) for every row; test top-1, mean ± std over the seeds; cost = median training "
             "step time relative to KD's, measured side by side in one process (schemes: every model "
             "they train for one batch; feature and relation terms run the generalist on the batch, KD "
             "only reads the cache). The methods follow RepDistiller's protocol: cross-entropy + weight * "
             "term, without the KD term, with the weights of its CIFAR-100 scripts where our formula is "
             "theirs; they were made for hundreds of epochs, and at this budget several stay below KD. "
             "Wall times are on 2 cores shared with other work.", ""]
    for dataset, data in results["datasets"].items():
        cost = results.get("steps", {}).get(dataset, {}).get("ratios", {})
        kd = data["table"].get("kd", {}).get("top1", {}).get("mean")
        lines += [f"### {dataset} ({data.get('epochs', '?')} student epochs)", "", "| method | what | test top-1 | vs KD | parameters | cost per step vs KD |",
                  "|---|---|---:|---:|---:|---:|"]
        for name, entry in data["table"].items():
            top1 = entry["top1"]
            delta = "" if kd is None or name in REFERENCE_ROWS else f"{top1['mean'] - kd:+.4f}"
            ratio = f"{cost[name]:.2f}" if name in cost else ""
            lines.append(f"| {name} | {entry['what']} | {top1['mean']:.4f} ± {top1['std']:.4f} | {delta} | "
                         f"{entry['params']:,} | {ratio} |")
        peer = results.get("steps", {}).get(dataset, {}).get("torchdistill")
        if peer:
            lines += ["", peer["line"]]
        lines.append("")
    return "\n".join(lines)


def section_span(text: str) -> tuple[int, int] | None:
    """Where this benchmark's section of a BENCHMARKS.md text starts and the next section starts
    (``len(text)`` when it is the last); None when it has none."""
    start = text.find(SECTION)
    if start < 0:
        return None
    following = text.find("\n## ", start + len(SECTION))
    return start, len(text) if following < 0 else following + 1


def write_section(md: str, path: Path = ROOT / "BENCHMARKS.md") -> None:
    """Put ``md`` in place of the section in ``path`` (appended when it has none)."""
    text = path.read_text() if path.exists() else ""
    span = section_span(text)
    if span is None:
        path.write_text(text.rstrip("\n") + "\n\n" + md)
        return
    rest = text[span[1]:]
    path.write_text(text[:span[0]] + md + ("\n" + rest if rest else ""))


def main(argv: list[str] | None = None) -> int:
    from benchmarks.kd_methods_steps import measure_steps

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="30 glyph classes, 4 student epochs (~20 min)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=sorted(DATASETS))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--reuse", action="store_true", help="keep finished teacher and method runs")
    args = parser.parse_args(argv)
    if "kd" not in args.methods:
        args.methods = ["kd", *args.methods]
    mode = "quick" if args.quick else "full"
    started = time.perf_counter()
    command = "python -m benchmarks.kd_methods" + (" --quick" if args.quick else "") + (" --reuse" if args.reuse else "")
    results: dict[str, Any] = {"command": command, "mode": mode, "seeds": args.seeds,
                               "methods": {m: list(METHODS[m]) for m in args.methods},
                               "datasets": {}, "steps": {}}
    for dataset in args.datasets:
        data = run_dataset(dataset, args.seeds, mode, args.methods, args.reuse)
        data["table"] = summarise(data, args.methods)
        results["datasets"][dataset] = data
        first = Path(data["seeds"][args.seeds[0]]["teacher"]["run"])
        print(f"== {dataset}: cost per step, side by side; torchdistill's KD vs ours", flush=True)
        results["steps"][dataset] = measure_steps(first, {m: METHODS[m][0] for m in args.methods},
                                                  [*STUDENT, f"distill.epochs={EPOCHS[dataset][mode]}"],
                                                  quick=args.quick)
    results["wall_seconds"] = time.perf_counter() - started
    if args.reuse and OUT_JSON.exists():   # the time the reused runs took when they were made
        previous = json.loads(OUT_JSON.read_text())
        results["runs_wall_seconds"] = previous.get("runs_wall_seconds", previous["wall_seconds"])
    OUT_JSON.parent.mkdir(parents=True, exist_ok=True)
    OUT_JSON.write_text(json.dumps(results, indent=2, default=str) + "\n")
    md = markdown(results)
    OUT_MD.write_text(md)
    write_section(md)
    print(md)
    print(f"wrote {OUT_JSON.relative_to(ROOT)}, {OUT_MD.relative_to(ROOT)} and its section of BENCHMARKS.md "
          f"in {results['wall_seconds'] / 60:.1f} min")
    best = {}   # the best method for the same student (born-again trains the generalist's architecture)
    for d in args.datasets:
        table = results["datasets"][d]["table"]
        same = [m for m in args.methods if table[m]["params"] == table["kd"]["params"]]
        best[d] = max(same, key=lambda m, t=table: t[m]["top1"]["mean"])
    print(" ".join(f"{d}_kd_top1={results['datasets'][d]['table']['kd']['top1']['mean']:.4f} {d}_best={best[d]}"
                   for d in args.datasets) + f" minutes={results['wall_seconds'] / 60:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
