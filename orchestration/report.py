"""The results report of a run: terminal tables, ``report.md`` in the run directory, MLflow.

Built from what the stages wrote (nothing is recomputed): the model rows of the distill stage
(``distill/results.json``; before that stage runs, the generalist and ensemble rows from their
own stages), the clustering stage's groups, the ensemble stage's evaluation (conditional
accuracy, Table 4, per-group accuracy). Two plots where a person would rather look than read:
test top-1 against parameters for every model, and the ensemble's top-1 gain per group.

    report = build_report(Path("runs/quickstart"))
    print_report(console, report)
    write_report(report, Path("runs/quickstart"))      # report.md, accuracy_vs_params.png, ...
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from orchestration.artifacts import (
    EVALUATION,
    GROUPS,
    METRICS,
    PLOT_GROUPS,
    PLOT_PARAMS,
    REPORT_MD,
    RESULTS,
    stage_dir,
)
from orchestration.files import atomic_write_bytes, atomic_write_text, read_json
from orchestration.tables import format_number, models_table, table4_table


class ReportError(FileNotFoundError):
    """The run has not got far enough to report on (the message says which stage to run)."""


def _read(path: Path) -> Any | None:
    return read_json(path) if path.exists() else None


def _generalist_row(run: Path) -> dict[str, Any] | None:
    metrics = _read(stage_dir(run, "generalist") / METRICS)
    if metrics is None:
        return None
    return {"name": "generalist", "teacher": "-", "top1": metrics.get("test_top1"),
            "top5": metrics.get("test_top5"), "params": metrics.get("params"),
            "latency_ms": metrics.get("latency_ms")}


def _model_rows(run: Path, evaluation: dict[str, Any] | None) -> list[dict[str, Any]]:
    results = _read(stage_dir(run, "distill") / RESULTS)
    if results is not None:
        rows = results["rows"] if isinstance(results, dict) else results
        return [dict(r) for r in rows]
    rows = [r for r in [_generalist_row(run)] if r]
    if evaluation is not None:  # top-5, size and latency of the ensemble come from the distill stage
        rows.append({"name": "ensemble", "teacher": "-", "top1": evaluation["ensemble_top1"]})
    return rows


def build_report(run: Path) -> dict[str, Any]:
    """Everything the report shows, as plain data; ReportError if no stage has finished."""
    run = Path(run)
    evaluation = _read(stage_dir(run, "ensemble") / EVALUATION)
    groups = _read(stage_dir(run, "clustering") / GROUPS)
    rows = _model_rows(run, evaluation)
    if not rows:
        raise ReportError(f"nothing to report in {run}: no stage has finished; run "
                          f"`specdistill run CONFIG run.dir={run}` first")
    report: dict[str, Any] = {"run_dir": str(run), "models": rows}
    if groups is not None:
        sizes = [len(g["classes"]) for g in groups["groups"]]
        report["groups"] = {
            "n_groups": len(sizes), "num_classes": groups["num_classes"], "method": groups["method"],
            "unassigned": len(groups["unassigned"]), "stability_ari": groups["metrics"].get("stability_ari"),
            "min_size": min(sizes, default=0), "max_size": max(sizes, default=0),
            "mean_size": sum(sizes) / len(sizes) if sizes else 0.0,
            "names": [g.get("names") or [str(c) for c in g["classes"]] for g in groups["groups"]],
        }
    report["baselines"] = _baselines(run, rows, groups)
    if evaluation is not None:
        report["ensemble"] = {k: evaluation.get(k) for k in (
            "generalist_top1", "ensemble_top1", "same_compute_top1", "n_examples", "n_covered",
            "covered_generalist_top1", "covered_ensemble_top1", "mean_active_specialists",
            "mean_covering_specialists", "n_specialists")}
        report["table4"] = evaluation["table4"]
        report["per_group"] = evaluation.get("per_group") or []
    return report


def _baselines(run: Path, rows: list[dict[str, Any]], groups: dict[str, Any] | None) -> dict[str, Any]:
    """How honest the comparison is: did the generalist converge, and how much of the ensemble's
    gain over the hard-label student the distilled student keeps."""
    metrics = _read(stage_dir(run, "generalist") / METRICS) or {}
    by_name = {r["name"]: r for r in rows}
    out: dict[str, Any] = {k: metrics.get(k) for k in ("early_stopped", "still_improving", "epochs_trained",
                                                          "best_epoch", "epoch_limit")}
    if groups is not None:
        out.update({k: groups["metrics"].get(k) for k in ("captured_share", "random_share", "ratio_to_random")})
    student, hard, ensemble = (by_name.get(n, {}).get("top1") for n in ("student", "hard_labels", "ensemble"))
    if None not in (student, hard, ensemble) and ensemble > hard:
        out["student_gain_kept"] = (student - hard) / (ensemble - hard)
    return out


def baseline_lines(report: dict[str, Any]) -> list[str]:
    """The honest-baseline sentences of the report (terminal and Markdown)."""
    b, lines = report.get("baselines", {}), []
    if b.get("still_improving"):
        limit = b.get("epoch_limit") or "generalist.epochs"
        lines.append(f"The generalist is NOT converged: it stopped at the epoch limit ({limit}; "
                     f"{b['epochs_trained']} epochs in all) with its holdout loss still falling; gains shown "
                     f"here may be extra training (raise {limit.split('=')[0]}).")
    elif b.get("early_stopped") is not None:
        lines.append(f"The generalist converged: early stopping after {b['epochs_trained']} epochs "
                     f"(best epoch {b['best_epoch']}).")
    e = report.get("ensemble", {})
    if e.get("same_compute_top1") is not None:
        lines.append(f"Same-compute generalist (trained on for as many examples as the specialists saw): "
                     f"top-1 {format_number(e['same_compute_top1'])}; ensemble minus same-compute "
                     f"{e['ensemble_top1'] - e['same_compute_top1']:+.4f}.")
    if b.get("captured_share") is not None:
        lines.append(f"The groups hold {b['captured_share']:.1%} of the generalist's holdout confusion mass; "
                     f"random groups of the same sizes {b['random_share']:.1%} "
                     f"({format_number(b['ratio_to_random'], '.1f')}x).")
    if b.get("student_gain_kept") is not None:
        lines.append(f"The student keeps {b['student_gain_kept']:.0%} of the ensemble's gain over the "
                     "hard-label student.")
    return lines


# ------------------------------------------------------------------------------ formatting
def _group_gains(report: dict[str, Any]) -> list[tuple[int, str, int, float]]:
    """(group id, label, examples, top-1 gain) per group with test examples, largest gain first."""
    names = report.get("groups", {}).get("names", [])
    gains = []
    for row in report.get("per_group", []):
        if row["n_examples"]:
            label = " ".join(names[row["group"]][:6]) if row["group"] < len(names) else str(row["group"])
            gains.append((row["group"], label, row["n_examples"], row["ensemble_top1"] - row["generalist_top1"]))
    return sorted(gains, key=lambda g: -g[3])


def markdown(report: dict[str, Any]) -> str:
    """The whole report as Markdown (``report.md``)."""
    lines = [f"# specdistill report: {report['run_dir']}", "", "## Models (test split)", "",
             models_table(report["models"]).markdown().rstrip("\n")]
    lines += ["", "Latency: per example at batch 1 on the run's device, all models measured side by side "
              "(median of round-robin rounds) at the end of the distill stage."]
    honest = baseline_lines(report)
    if honest:
        lines += ["", "## Baselines", ""] + honest
    if "groups" in report:
        g = report["groups"]
        lines += ["", "## Specialist groups", "",
                  f"{g['n_groups']} groups of {g['num_classes']} classes ({g['method']}), sizes "
                  f"{g['min_size']}-{g['max_size']} (mean {g['mean_size']:.1f}), {g['unassigned']} classes "
                  f"unassigned, stability ARI {format_number(g['stability_ari'], '.3f')}."]
    if "ensemble" in report:
        e = report["ensemble"]
        lines += ["", "## Ensemble (paper section 5)", "",
                  f"Generalist top-1 {format_number(e['generalist_top1'], '.4f')} -> ensemble "
                  f"{format_number(e['ensemble_top1'], '.4f')} on {e['n_examples']:,} test examples; "
                  f"{e['n_covered']:,} covered by a specialist, conditional top-1 "
                  f"{format_number(e['covered_generalist_top1'], '.4f')} -> {format_number(e['covered_ensemble_top1'], '.4f')}; "
                  f"{format_number(e.get('mean_covering_specialists'), '.2f')} specialists cover a test example's "
                  f"class on average, {format_number(e.get('mean_active_specialists'), '.2f')} are active per example.",
                  "", table4_table(report["table4"]).markdown().rstrip("\n")]
        gains = _group_gains(report)
        if gains:
            lines += ["", "Largest and smallest per-group gains (ensemble - generalist top-1):", "",
                      "| group | classes | # test examples | gain |", "|---:|---|---:|---:|"]
            shown = gains[:5] + [g for g in gains[-3:] if g not in gains[:5]]
            lines += [f"| {gid} | {label} | {n} | {gain:+.3f} |" for gid, label, n, gain in shown]
    plots = [p for p in (PLOT_PARAMS, PLOT_GROUPS) if p in report.get("plots", [])]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def print_report(console, report: dict[str, Any]) -> None:
    """The model table (and, when the ensemble ran, Table 4) in the terminal."""
    from rich.console import Console

    # Wide enough that no cell wraps, also when stdout is a file or a job log (rich's 80 columns).
    console = Console(width=max(console.width, 132), soft_wrap=True, file=console.file)
    console.print(models_table(report["models"], f"specdistill results: {report['run_dir']}").rich())
    for line in baseline_lines(report):
        console.print(line, markup=False, highlight=False)
    if "groups" in report:
        g = report["groups"]
        console.print(f"groups: {g['n_groups']} of {g['num_classes']} classes ({g['method']}), sizes "
                      f"{g['min_size']}-{g['max_size']}, stability ARI {format_number(g['stability_ari'], '.3f')}")
    if "ensemble" in report:
        e = report["ensemble"]
        console.print(f"ensemble: test top1 generalist {format_number(e['generalist_top1'], '.4f')} -> ensemble "
                      f"{format_number(e['ensemble_top1'], '.4f')}; covered by a specialist {e['n_covered']:,} of "
                      f"{e['n_examples']:,}, conditional top1 {format_number(e['covered_generalist_top1'], '.4f')} -> "
                      f"{format_number(e['covered_ensemble_top1'], '.4f')}; specialists covering a test example's "
                      f"class {format_number(e.get('mean_covering_specialists'), '.2f')} on average, active "
                      f"{format_number(e.get('mean_active_specialists'), '.2f')}")
        console.print(table4_table(report["table4"]).rich())


# ------------------------------------------------------------------------------ plots + files
def plot_accuracy_vs_params(report: dict[str, Any]):
    """Test top-1 against parameters (log x), one marker per model, named in a legend beside the
    axes (models of one size, e.g. a student and its baselines, would stack their labels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4), layout="constrained")
    rows = [r for r in report["models"] if r.get("params") and r.get("top1") is not None]
    for i, row in enumerate(rows):
        ax.scatter(row["params"], row["top1"], marker=_MARKERS[i % len(_MARKERS)], s=90 - 8 * (i % 8),
                   facecolors="none" if i % 2 else None, label=f"{row['name']} ({row['top1']:.3f})")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("test top-1")
    ax.set_title("accuracy vs parameters")
    ax.grid(True, alpha=0.3)
    if rows:
        fig.legend(loc="outside right upper", fontsize=8, title="model (test top-1)", title_fontsize=8)
    return fig


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def plot_group_gains(report: dict[str, Any]):
    """Ensemble minus generalist top-1 per group, sorted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gains = _group_gains(report)
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(gains)), 4), layout="constrained")
    ax.bar(range(len(gains)), [g[3] for g in gains],
           color=["tab:green" if g[3] >= 0 else "tab:red" for g in gains])
    ax.set_xticks(range(len(gains)), [str(g[0]) for g in gains], fontsize=6)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xlabel("group id")
    ax.set_ylabel("top-1 gain\n(ensemble - generalist)")
    ax.set_title("per-group accuracy gain\n(test examples of the group's classes)", fontsize=10)
    return fig


_SAVE_FIX = ("The report itself is complete (printed above); to save report.md and the plots, make "
             "{run} writable or copy the run directory to a writable place and run `specdistill "
             "report` on the copy")


def write_report(report: dict[str, Any], run: Path) -> list[Path]:
    """``report.md`` and the plots in the run directory; returns the files written."""
    import matplotlib.pyplot as plt


    run = Path(run)
    written, plots = [], []
    figures = [(PLOT_PARAMS, plot_accuracy_vs_params)]
    if _group_gains(report):
        figures.append((PLOT_GROUPS, plot_group_gains))
    for name, draw in figures:
        fig = draw(report)
        image = io.BytesIO()
        fig.savefig(image, format="png", dpi=120)
        plt.close(fig)
        atomic_write_bytes(run / name, image.getvalue(), fix=_SAVE_FIX.format(run=run))
        written.append(run / name)
        plots.append(name)
    report["plots"] = plots
    atomic_write_text(run / REPORT_MD, markdown(report), fix=_SAVE_FIX.format(run=run))
    return [run / REPORT_MD, *written]


def log_report(client, run_id: str, files: list[Path], report: dict[str, Any]) -> None:
    """The report files and the model table as artifacts (and a few metrics) of an MLflow run."""
    for path in files:
        client.log_artifact(run_id, str(path), artifact_path="report")
    models = report["models"]
    client.log_table(run_id, data={k: [r.get(k) for r in models] for k in models[0]},
                     artifact_file="report/models.json")
    for row in models:
        if row.get("top1") is not None:
            client.log_metric(run_id, f"report.{row['name']}.top1", float(row["top1"]))
