"""The quality benchmark's figures from run results (no training)."""

import json

import pytest

from benchmarks.quality import aggregate, per_run, print_summary, summary_line, table4_by_coverage
from benchmarks.quality_report import markdown


def _run(seed, gen=0.90, same=0.91, ens=0.92, student=0.89, from_gen=0.87, hard=0.86):
    return {"seed": seed, "returncode": 0, "generalist_top1": gen, "same_compute_top1": same,
            "ensemble_top1": ens, "grouping_ratio": 4.0, "captured_share": 0.6, "random_share": 0.15,
            "students": {"student": student, "generalist_kd": from_gen, "hard_labels": hard, "data_free": 0.5},
            "table4": [{"specialists_covering": 0, "n_examples": 10, "generalist_correct": 9, "ensemble_correct": 9,
                        "same_compute_correct": 9},
                       {"specialists_covering": 1, "n_examples": 90, "generalist_correct": 80,
                        "ensemble_correct": 84, "same_compute_correct": 82}]}


def test_derived_figures_by_hand():
    d = per_run(_run(0))
    assert d["ensemble_rel_gain"] == pytest.approx(0.92 / 0.90 - 1)
    assert d["ensemble_err_reduction"] == pytest.approx(1 - 0.08 / 0.10)
    assert d["same_compute_rel_gain"] == pytest.approx(0.92 / 0.91 - 1)
    assert d["student_minus_generalist"] == pytest.approx(-0.01)
    assert d["student_ens_minus_gen"] == pytest.approx(0.02)
    assert d["student_gain_kept"] == pytest.approx(0.03 / 0.06)
    assert per_run({"returncode": 0})["ensemble_rel_gain"] is None


def test_aggregate_summary_and_table4_over_seeds():
    runs = [_run(0), _run(1, ens=0.94), {"seed": 2, "returncode": 1, "error": "boom"}]
    agg = aggregate(runs)
    assert agg["ensemble_top1"]["mean"] == pytest.approx(0.93) and agg["ensemble_top1"]["std"] > 0
    line = summary_line("glyphs", runs)
    assert line.startswith("dataset=glyphs seeds=2 ensemble_rel_gain=0.0")
    assert "grouping_ratio=4.0" in line and "student_ens_minus_gen=0.020" in line
    t4 = table4_by_coverage(runs[:2])
    assert t4[1]["n_examples"] == 180 and t4[1]["relative_vs_generalist"] == pytest.approx((84 - 80) / 80)
    assert t4[1]["relative_vs_same_compute"] == pytest.approx(2 / 82)


def test_markdown_and_summary_from_results_json(tmp_path, capsys):
    quality = {"seeds": [0, 1], "base": {"omniglot-5": [_run(0), _run(1, ens=0.94)], "glyphs-full": [],
                                         "glyphs": [{**_run(0), "same_compute_recipe": "generalist"}],
                                         "glyphs-heldout-fonts": [_run(0, same=None)]},
               "commands": {"omniglot-5": "specdistill run configs/full.yaml run.seed=S"},
               "ablation_dataset": "omniglot-5", "ablation_seeds": [0],
               "ablation": {"disjoint groups, top-1 routing": [_run(0, ens=0.91)]}}
    text = "\n".join(markdown(quality))
    assert "| omniglot-5 | 0, 1 | 0.9000 ± 0.0000 | 0.9100 ± 0.0000 | 0.9300 ± 0.0141 |" in text
    assert "- omniglot-5: `specdistill run configs/full.yaml run.seed=S`" in text
    assert "not measured (no finished run): glyphs-full" in text and "| glyphs-full |" not in text
    assert ("Same-compute rows trained with the specialists' recipe: omniglot-5; the generalist's recipe: glyphs; "
            "no model (specialists.same_compute=false): glyphs-heldout-fonts." in text)
    # a run collected before the recipe was recorded had the specialists' one; a run without the
    # baseline is not labelled with a recipe it never trained
    assert "| full method | 0.9000 | 0.9100 | 0.9200 |" in text and "(seeds 0, the same for every row)" in text
    assert "| disjoint groups, top-1 routing | 0.9000 | 0.9100 | 0.9100 |" in text and "1: 180 ex., +5.0% / +2.4%" in text
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"quality": quality}))
    assert print_summary(path) == 0
    assert capsys.readouterr().out.startswith("dataset=omniglot-5 seeds=2")
    assert print_summary(tmp_path / "missing.json") == 1


def test_collect_gathers_finished_runs_and_trains_nothing(tmp_path, monkeypatch, capsys):
    import benchmarks.quality as quality

    monkeypatch.setattr(quality, "RUNS", tmp_path)
    finished = tmp_path / "glyphs" / "seed0"
    (finished / "distill").mkdir(parents=True)
    (finished / "distill" / "manifest.json").write_text("{}")
    (finished / "distill" / "results.json").write_text(json.dumps(
        {"rows": [{"name": "student", "top1": 0.8, "params": 10}]}))
    (finished / "ensemble").mkdir()
    (finished / "specialists" / "same_compute").mkdir(parents=True)
    (finished / "specialists" / "same_compute" / "model.json").write_text(json.dumps(
        {"same_compute": {"recipe": "generalist", "budget": 100}}))
    (finished / "ensemble" / "evaluation.json").write_text(json.dumps(
        {"generalist_top1": 0.9, "ensemble_top1": 0.92}))
    monkeypatch.setattr(quality, "run_once", lambda *a, **k: pytest.fail("--collect must not train"))
    out = quality.base_runs(["glyphs"], [0, 1], tmp_path / "omniglot", "sqlite://", reuse=False, collect_only=True)
    assert [r["seed"] for r in out["glyphs"]] == [0]
    assert out["glyphs"][0]["ensemble_top1"] == 0.92 and out["glyphs"][0]["students"] == {"student": 0.8}
    assert out["glyphs"][0]["same_compute_recipe"] == "generalist"
    assert "no finished run in" in capsys.readouterr().out
