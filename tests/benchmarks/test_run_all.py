"""benchmarks/run_all.py: how it launches the benchmarks, aggregation over seeds and the
BENCHMARKS.md it writes."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
RUN_ALL = runpy.run_path(str(ROOT / "benchmarks" / "run_all.py"))


def test_components_run_as_modules_from_the_repository_root(monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append((cmd, kwargs["cwd"]))
        return subprocess.CompletedProcess(cmd, 0, stdout="figures\nspeedup=120.5 solver=fixed\n", stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    result = RUN_ALL["run_component"]("combine", quick=True)
    assert calls == [([sys.executable, "-m", "benchmarks.combine", "--quick"], ROOT)]
    assert result["command"] == "python -m benchmarks.combine --quick" and result["returncode"] == 0
    assert result["figures"] == {"speedup": 120.5, "solver": "fixed"}


def test_every_benchmark_imports_as_a_module_of_the_benchmarks_package():
    """What `python -m benchmarks.<name>` does first: import it with the repository root (the
    working directory) on sys.path, where `clustering`, `specialists`, ... are the packages."""
    modules = [f"benchmarks.{name}" for name in RUN_ALL["COMPONENTS"]]
    code = f"import importlib; print([importlib.import_module(m).__name__ for m in {modules!r}])"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == repr(modules), done.stderr[-3000:]


def _run(seed: int, top1: float, seconds: float) -> dict:
    return {"seed": seed, "returncode": 0, "seconds": seconds,
            "stage_seconds": {"generalist": 50.0, "clustering": 2.0, "specialists": 90.0,
                              "ensemble": 30.0, "distill": 150.0},
            "models": [{"name": "student", "teacher": "ensemble", "top1": top1, "top5": 0.99,
                        "params": 95152, "latency_ms": 0.4}],
            "ensemble": {"generalist_top1": 0.93, "ensemble_top1": 0.94},
            "groups": {"n_groups": 32, "num_classes": 320, "method": "spectral", "min_size": 2, "max_size": 38,
                       "unassigned": 0, "stability_ari": 0.651},
            "table4": [{"specialists_covering": 1, "n_examples": 4800, "delta_correct": 48,
                        "relative_accuracy_change": 0.0107}]}


def test_aggregate_gives_mean_and_spread_over_seeds():
    agg = RUN_ALL["aggregate"]([_run(0, 0.90, 300), _run(1, 0.92, 320), _run(2, 0.91, 310),
                                {"seed": 3, "returncode": 1, "error": "boom"}])
    assert agg["n_runs"] == 3
    assert agg["models"]["student"]["top1"]["mean"] == pytest.approx(0.91)
    assert agg["models"]["student"]["top1"]["std"] == pytest.approx(0.01)
    assert agg["wall_seconds"]["mean"] == pytest.approx(310)
    assert agg["ensemble_gain"]["mean"] == pytest.approx(0.01)


def test_markdown_has_machine_components_pipeline_and_failures():
    runs = [_run(0, 0.90, 300), _run(1, 0.92, 320), {"seed": 2, "returncode": 1, "error": "boom"}]
    results = {"command": "python -m benchmarks.run_all", "date": "2026-11-23",
               "machine": {"cpu": "x", "cpus": 2, "memory_gib": 24, "gpu": None, "python": "3.11",
                           "platform": "linux", "versions": {"torch": "2.14.1"}},
               "components": {"combine": {"command": "python -m benchmarks.combine --quick", "seconds": 30,
                                          "returncode": 0, "last_line": "speedup=100 objective_gap=1e-9"}},
               "pipeline_runs": runs, "pipeline_command": "specdistill run configs/quickstart.yaml run.seed=S",
               "pipeline": RUN_ALL["aggregate"](runs), "wall_seconds": 600}
    text = RUN_ALL["markdown"](results)
    assert "torch 2.14.1" in text and "`speedup=100 objective_gap=1e-9`" in text
    assert "| student | ensemble | 0.9100 ± 0.0141 |" in text
    assert "seeds 0, 1" in text and "Pipeline seed 2 FAILED" in text and "CIFAR-100" in text
    assert "python -m benchmarks.run_all --config configs/cifar100.yaml" in text
    assert "| 0 | 300 | 32 (0.651) | 0.9000 |" in text and "| 1 | 320 | 32 (0.651) | 0.9200 |" in text  # per seed
    assert "groups: 32 of 320 classes (spectral), sizes 2-38, 0 unassigned, stability ARI 0.651" in text
    assert "| student | ensemble | 0.9000 | 0.9900 | 95,152 | 0.400 |" in text  # seed 0's report


def test_collect_reads_a_finished_run_directory(tmp_path):
    """What a seed's entry is made of: stage seconds, models, groups, ensemble, Table 4."""
    import json

    run = tmp_path / "seed0"
    for stage, seconds in (("generalist", 40.0), ("clustering", 2.0), ("specialists", 90.0),
                           ("ensemble", 20.0), ("distill", 180.0)):
        (run / stage).mkdir(parents=True)
        (run / stage / "manifest.json").write_text(json.dumps({"metrics": {"stage_seconds": seconds}}))
    (run / "clustering" / "groups.json").write_text(json.dumps({
        "num_classes": 6, "method": "spectral", "unassigned": [5], "metrics": {"stability_ari": 0.5},
        "groups": [{"classes": [0, 1, 2]}, {"classes": [3, 4]}]}))
    (run / "distill" / "results.json").write_text(json.dumps({"rows": [{"name": "student", "top1": 0.9}]}))
    (run / "ensemble" / "evaluation.json").write_text(json.dumps({
        "generalist_top1": 0.9, "ensemble_top1": 0.92, "table4": [{"specialists_covering": 1}]}))
    result = {}
    RUN_ALL["_collect"](run, result)
    assert result["stage_seconds"]["distill"] == 180.0 and result["models"] == [{"name": "student", "top1": 0.9}]
    assert result["groups"] == {"n_groups": 2, "num_classes": 6, "method": "spectral", "min_size": 2,
                                "max_size": 3, "unassigned": 1, "stability_ari": 0.5}
    assert result["ensemble"]["ensemble_top1"] == 0.92 and result["table4"] == [{"specialists_covering": 1}]


def test_the_distillation_methods_table_is_kept_when_merging_without_re_running_it(tmp_path):
    section = "## Distillation methods side by side\n\n| method | top-1 |\n|---|---:|\n| kd | 0.5 |\n"
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n" + section + "\n## The same on CIFAR-100 with a GPU\n\ntext\n")
    kept = RUN_ALL["kd_methods_section"]({"components": {}}, {"command": "earlier"}, md)
    assert kept == section
    assert RUN_ALL["kd_methods_section"]({"components": {}}, {"kd_methods_md": "## stored\n"}, md) == "## stored\n"
    assert RUN_ALL["kd_methods_section"]({"components": {}}, {}, md) is None  # no --merge: nothing carried over


def test_the_scale_output_is_a_section_without_the_ray_workers_lines():
    from benchmarks.run_all import _scale_lines

    output = ("memory as data grows 10x:\n(RayTrainWorker pid=1) epoch 1/3\n"
              "2026/12/01 INFO mlflow.store: Creating tables\nrss_ratio_10x=1.05 ddp_speedup=1.8 input_img_per_s_per_core=9000\n")
    lines = _scale_lines({"scale": {"command": "python -m benchmarks.scale --quick", "returncode": 0, "output": output}})
    text = "\n".join(lines)
    assert "## Scale (`python -m benchmarks.scale --quick`)" in text
    assert "rss_ratio_10x=1.05 ddp_speedup=1.8" in text and "RayTrainWorker" not in text and "INFO" not in text
    assert _scale_lines({"scale": {"command": "x", "returncode": 1, "output": output}}) == []


def _quality(names: list[str], top1: float, ablation: str = "") -> dict:
    runs = {name: [{"seed": 0, "returncode": 0, "generalist_top1": top1}] for name in names}
    out = {"seeds": [0], "base": runs, "commands": {name: f"specdistill run {name}" for name in names}}
    if ablation:
        out.update(ablation_dataset=ablation, ablation={"lever off": [{"seed": 0}]}, ablation_seeds=[0])
    return out


def test_quality_rows_of_data_sets_not_re_run_are_kept_when_merging(tmp_path, monkeypatch):
    """`--quality --merge` with `--quality-args=--datasets glyphs`: glyphs' rows are replaced, the
    other data sets and the ablation keep the rows the earlier results.json has; a failed quality
    run loses none of them and makes run_all exit 1."""
    out, md = tmp_path / "results.json", tmp_path / "BENCHMARKS.md"
    earlier = _quality(["glyphs", "omniglot-5"], 0.5, ablation="omniglot-5")
    out.write_text(json.dumps({"command": "earlier", "quality": earlier}))
    calls = []

    def fake_quality(reuse, extra):
        calls.append(extra)
        return _quality(["glyphs"], 0.9) if len(calls) == 1 else {"returncode": 2, "base": {}}

    module_globals = RUN_ALL["main"].__globals__  # runpy returns a copy; main reads the original
    monkeypatch.setitem(module_globals, "run_quality", fake_quality)
    argv = ["--only", "--seeds", "--merge", "--quality", "--out", str(out), "--md", str(md),
            "--quality-args=--datasets glyphs"]
    assert RUN_ALL["main"](argv) == 0
    assert calls == [["--datasets", "glyphs"]]
    merged = json.loads(out.read_text())["quality"]
    assert merged["base"]["glyphs"][0]["generalist_top1"] == 0.9
    assert merged["base"]["omniglot-5"][0]["generalist_top1"] == 0.5
    assert set(merged["commands"]) == {"glyphs", "omniglot-5"}
    assert merged["ablation_dataset"] == "omniglot-5" and merged["ablation"] == earlier["ablation"]
    assert RUN_ALL["main"](argv) == 1
    failed = json.loads(out.read_text())["quality"]
    assert failed["returncode"] == 2 and failed["base"] == merged["base"]


def test_an_ablation_collected_without_runs_keeps_the_earlier_levers_and_seeds():
    """`benchmarks.quality --collect` with the ablation's data set but no ablation run on disk writes
    each lever with no rows; merging keeps the earlier rows lever by lever and seed by seed."""
    earlier = _quality(["omniglot-5"], 0.5, ablation="omniglot-5")
    earlier["ablation"] = {"groups off": [{"seed": 0, "x": 1}, {"seed": 1, "x": 2}], "aug off": [{"seed": 0, "x": 3}]}
    earlier["ablation_seeds"] = [0, 1]
    empty = {**_quality(["omniglot-5"], 0.9), "ablation_dataset": "omniglot-5",
             "ablation": {"groups off": [], "aug off": []}, "ablation_seeds": []}
    merged = RUN_ALL["merge_quality"](empty, earlier)
    assert merged["ablation"] == earlier["ablation"] and merged["ablation_seeds"] == [0, 1]
    assert merged["base"]["omniglot-5"][0]["generalist_top1"] == 0.9

    one_seed = {**empty, "ablation": {"groups off": [{"seed": 1, "x": 9}], "aug off": []}, "ablation_seeds": [1]}
    merged = RUN_ALL["merge_quality"](one_seed, earlier)
    assert merged["ablation"] == {"groups off": [{"seed": 0, "x": 1}, {"seed": 1, "x": 9}],
                                  "aug off": [{"seed": 0, "x": 3}]}
    other = {**empty, "ablation_dataset": "glyphs", "ablation": {"groups off": [{"seed": 0, "x": 7}]}}
    assert RUN_ALL["merge_quality"](other, earlier)["ablation_dataset"] == "glyphs"
    assert RUN_ALL["merge_quality"]({**other, "ablation": {"groups off": []}}, earlier)["ablation"] == earlier["ablation"]


def test_unbalanced_quotes_in_quality_args_are_a_usage_error_that_names_the_fix(capsys):
    with pytest.raises(SystemExit) as exc:
        RUN_ALL["main"](["--only", "--seeds", "--quality", "--quality-args=--datasets 'glyphs"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--quality-args" in err and "No closing quotation" in err and "quote it as one string" in err
