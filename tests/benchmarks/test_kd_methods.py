"""benchmarks/kd_methods.py: a method through the distill stage in a copy of a teacher run, the
side-by-side step timing and the torchdistill comparison, the table and its BENCHMARKS.md section."""

from __future__ import annotations

import shutil

import pytest

from benchmarks import kd_methods
from benchmarks.kd_methods_steps import measure_steps


@pytest.fixture
def teacher(finished_run, tmp_path, monkeypatch):
    """A copy of the session's finished tiny run as a benchmark teacher run (16x16 hierarchy images)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = tmp_path / "seed0" / "teacher"
    shutil.copytree(finished_run["path"], path)
    return path


def test_a_method_runs_as_the_distill_stage_in_a_copy_of_the_teacher_run(teacher, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = kd_methods.method_run(teacher, "dkd", 1, uri, reuse=False)
    assert set(run["rows"]) == {"generalist", "ensemble", "same_compute", "student"}
    assert "distill.losses={dkd: 1.0}" in run["overrides"] and "distill.epochs=1" in run["overrides"]
    assert (teacher.parent / "dkd" / "distill.log").exists() and not (teacher / "distill").exists()
    again = kd_methods.method_run(teacher, "dkd", 1, uri, reuse=True)   # kept, not retrained
    assert again["rows"] == run["rows"]


def test_steps_are_timed_side_by_side_and_torchdistill_trains_the_same_student(teacher):
    methods = {m: kd_methods.METHODS[m][0] for m in ("kd", "dkd", "crd", "mutual", "born_again", "teacher_assistant")}
    timing = measure_steps(teacher, methods, [*kd_methods.STUDENT, "distill.epochs=1"], quick=True)
    assert timing["ratios"]["kd"] == 1.0 and set(timing["ratios"]) == set(methods)
    assert all(r > 0 for r in timing["ratios"].values()) and timing["rounds"] == 6
    peer = timing["torchdistill"]
    if peer["installed"]:
        # the two losses agree to float precision, so the two students end where they started together
        assert peer["max_relative_loss_gap"] < 1e-5
        assert peer["ours"] == pytest.approx(peer["torchdistill"], abs=1 / 72 + 1e-9)
        assert "test top-1" in peer["line"]


def _fake_results() -> dict:
    rows = {"generalist": {"top1": 0.9, "params": 1000, "teacher": "none"},
            "ensemble": {"top1": 0.95, "params": 5000, "teacher": "generalist + 2"},
            "hard_labels": {"top1": 0.7, "params": 100, "teacher": "labels"},
            "generalist_kd": {"top1": 0.75, "params": 100, "teacher": "generalist"},
            "student": {"top1": 0.8, "params": 100, "teacher": "ensemble (cache)"}}
    seeds = {s: {"methods": {"kd": {"rows": {**rows, "student": {**rows["student"], "top1": 0.8 + 0.02 * s}}},
                             "dkd": {"rows": {"student": {"top1": 0.82 + 0.02 * s, "params": 100}}},
                             "mutual": {"rows": {"mutual_1": {"top1": 0.78, "params": 100}}}}}
             for s in (0, 1)}
    return {"seeds": seeds}


def test_summary_and_markdown():
    data = _fake_results()
    table = kd_methods.summarise(data, ["kd", "dkd", "mutual"])
    assert list(table) == ["generalist", "ensemble", "hard_labels", "generalist_kd", "kd", "dkd", "mutual"]
    assert table["kd"]["top1"]["mean"] == pytest.approx(0.81) and table["kd"]["top1"]["std"] == pytest.approx(0.01414, abs=1e-4)
    assert table["mutual"]["row"] == "mutual_1"
    results = {"command": "python -m benchmarks.kd_methods --quick", "mode": "quick", "seeds": [0, 1],
               "wall_seconds": 600.0, "datasets": {"glyphs": {"table": table, "epochs": 12}},
               "steps": {"glyphs": {"ratios": {"kd": 1.0, "dkd": 1.08, "mutual": 2.1},
                                    "torchdistill": {"line": "torchdistill x vs ours: 0.8 vs 0.8"}}}}
    md = kd_methods.markdown(results)
    assert md.startswith(kd_methods.SECTION) and "### glyphs (12 student epochs)" in md
    assert "| dkd | DKD alpha 1, beta 8, T 4 (mdistiller CIFAR-100) | 0.8300 ± 0.0141 | +0.0200 | 100 | 1.08 |" in md
    assert "| generalist | none | 0.9000 ± 0.0000 |  | 1,000 |  |" in md and "torchdistill x vs ours" in md


def test_section_replaces_its_earlier_self_and_keeps_the_rest(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## A\n\na\n")
    kd_methods.write_section(f"{kd_methods.SECTION}\n\nfirst\n", path)
    assert path.read_text() == f"# Benchmarks\n\n## A\n\na\n\n{kd_methods.SECTION}\n\nfirst\n"
    path.write_text(path.read_text() + "\n## B\n\nb\n")
    kd_methods.write_section(f"{kd_methods.SECTION}\n\nsecond\n", path)
    assert path.read_text() == f"# Benchmarks\n\n## A\n\na\n\n{kd_methods.SECTION}\n\nsecond\n\n## B\n\nb\n"
