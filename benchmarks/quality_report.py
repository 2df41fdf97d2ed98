"""The quality benchmark's tables (BENCHMARKS.md) and its one-line summary per data set.

``results`` is what :mod:`benchmarks.quality` wrote (``benchmarks/results/quality.json``),
stored by ``benchmarks.run_all`` under the ``"quality"`` key of ``benchmarks/results.json``.
"""

from __future__ import annotations

from typing import Any

from benchmarks.quality import aggregate, per_run, summary_line, table4_by_coverage
from orchestration.config_sections import SAME_COMPUTE_RECIPES
from orchestration.tables import format_number

MAIN_COLUMNS = (
    ("generalist_top1", "converged generalist"), ("same_compute_top1", "same-compute generalist"),
    ("ensemble_top1", "ensemble"), ("ensemble_err_reduction", "error reduction"),
    ("ensemble_rel_gain", "rel. gain vs generalist"), ("same_compute_rel_gain", "rel. gain vs same-compute"),
    ("captured_share", "confusion held by groups"), ("grouping_ratio", "ratio to random groups"),
)
STUDENT_COLUMNS = (
    ("student_top1", "student (ensemble)"), ("generalist_kd_top1", "student (generalist)"),
    ("hard_labels_top1", "student (hard labels)"), ("data_free_top1", "student (data-free)"),
    ("student_minus_generalist", "student - generalist"), ("student_ens_minus_gen", "ensemble- minus generalist-taught"),
    ("student_gain_kept", "share of the ensemble's gain kept"),
)


def _cells(agg: dict[str, dict[str, Any]], columns) -> list[str]:
    fmt = {"grouping_ratio": ".1f"}
    return [format_number(agg.get(key, {}), fmt.get(key, ".4f")) for key, _ in columns]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1),
            *["| " + " | ".join(r) + " |" for r in rows]]


def markdown(quality: dict[str, Any]) -> list[str]:
    """The BENCHMARKS.md section: main figures, students, Table 4 by coverage, the ablation."""
    measured = {name: runs for name, runs in quality.get("base", {}).items() if _seeds(runs) != "none"}
    missing = [name for name in quality.get("base", {}) if name not in measured]
    base = measured
    if not base:
        return []
    lines = ["", "## Does it pay off? Quality over seeds (`python -m benchmarks.quality`)", "",
             "Mean ± std over the seeds each data set lists. The generalist is trained to convergence (early stopping on "
             "the holdout loss); the same-compute generalist is it trained on for as many examples as "
             "all specialists together saw (`specialists.same_compute_recipe`, the generalist's own recipe by "
             "default), keeping its epoch with the best holdout top-1; error reduction = 1 - ensemble error / "
             "generalist error. configs/quickstart.yaml trains in bf16 mixed precision on a CPU that computes "
             "bf16 natively (`run.cpu_bf16`; evaluation and teachers in float32), configs/full.yaml in float32.", ""]
    lines += [f"- {name}: `{command}`" for name, command in quality.get("commands", {}).items() if name in base]
    lines += [f"- not measured (no finished run): {', '.join(missing)}"] if missing else []
    lines += [""] if quality.get("commands") or missing else []
    aggs = {name: aggregate(runs) for name, runs in base.items()}
    lines += _table(["data set", "seeds", *[label for _, label in MAIN_COLUMNS]],
                    [[name, _seeds(base[name]), *_cells(aggs[name], MAIN_COLUMNS)] for name in base])
    lines += _recipes(base)
    lines += ["", "Students (a quarter of the generalist's parameters or fewer; the same budget each):", ""]
    lines += _table(["data set", *[label for _, label in STUDENT_COLUMNS]],
                    [[name, *_cells(_with_kept(aggs[name], base[name]), STUDENT_COLUMNS)] for name in base])
    lines += ["", "Table 4 (all seeds): relative accuracy change by the number of specialists covering "
              "the true class, against the generalist / against the same-compute generalist:", ""]
    for name, runs in base.items():
        cells = [f"{r['specialists_covering']}: {r['n_examples']} ex., {_pct(r['relative_vs_generalist'])} / "
                 f"{_pct(r['relative_vs_same_compute'])}" for r in table4_by_coverage(runs)]
        lines.append(f"- {name}: " + "; ".join(cells))
    lines += _ablation(quality, aggs)
    lines += ["", "Summary (`python -m benchmarks.quality --summary`):", "", "```",
              *[summary_line(name, runs) for name, runs in base.items()], "```"]
    return lines


def _recipes(base: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Which recipe each data set's same-compute row was trained with (runs collected before the
    recipe was recorded had the specialists' one, the only one there was; a run without a
    same-compute model, ``specialists.same_compute: false``, is named as such)."""
    by_recipe: dict[str, list[str]] = {}
    for name, runs in base.items():
        recipes = {_recipe(r) for r in runs if r.get("returncode", 0) == 0}
        by_recipe.setdefault(" and ".join(sorted(recipes)), []).append(name)
    return ["", "Same-compute rows trained with " + "; ".join(f"{recipe}: {', '.join(sets)}"
                                                          for recipe, sets in by_recipe.items()) + "."]


def _recipe(run: dict[str, Any]) -> str:
    """The run's same-compute recipe in words."""
    if run.get("same_compute_top1") is None:
        return "no model (specialists.same_compute=false)"
    recipe = run.get("same_compute_recipe") or "specialists"
    return SAME_COMPUTE_RECIPES.get(recipe, recipe)


def _seeds(runs: list[dict[str, Any]]) -> str:
    return ", ".join(str(r["seed"]) for r in runs if r.get("returncode", 0) == 0) or "none"


def _with_kept(agg: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    kept = [per_run(r)["student_gain_kept"] for r in runs if r.get("returncode", 0) == 0]
    kept = [k for k in kept if k is not None]
    mean = sum(kept) / len(kept) if kept else None
    return {**agg, "student_gain_kept": {"mean": mean, "std": None}}


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1%}"


def _ablation(quality: dict[str, Any], aggs: dict[str, Any]) -> list[str]:
    name, runs = quality.get("ablation_dataset"), quality.get("ablation") or {}
    if not runs or name not in aggs:
        return []
    columns = (("generalist_top1", "generalist"), ("same_compute_top1", "same-compute"),
               ("ensemble_top1", "ensemble"), ("ensemble_rel_gain", "rel. gain vs generalist"),
               ("same_compute_rel_gain", "rel. gain vs same-compute"), ("grouping_ratio", "grouping ratio"),
               ("student_top1", "student (ensemble)"), ("student_ens_minus_gen", "ensemble- minus generalist-taught"))
    seeds = quality.get("ablation_seeds", quality.get("seeds", []))
    full = [r for r in quality["base"][name] if r.get("seed") in seeds]
    rows = [["full method", *_cells(aggregate(full), columns)]]
    rows += [[lever, *_cells(aggregate(lever_runs), columns)] for lever, lever_runs in runs.items()]
    shown = ", ".join(map(str, seeds))
    return ["", f"Ablation on {name}: each lever switched off in turn (seeds {shown}, the same for every row):", "",
            *_table(["", *[label for _, label in columns]], rows)]
