"""Every distillation method and training scheme through ``specdistill distill``, each on a private
copy of the session's finished tiny run (9 classes, 1x16x16; student ``cnn`` at width 0.125:
blocks 4/8/16 channels at 16/8/4 pixels, generalist ``cnn`` at 0.25: 8/16/32 channels), one
epoch, one shared MLflow store; and the bad inputs of the methods, refused before training."""

from __future__ import annotations

import json
import shutil

import pytest

from orchestration.cli import main

ONE_EPOCH = ("distill.epochs=1", "distill.batch_size=32", "distill.eval_batch_size=64", "distill.width=0.125",
             "distill.student=cnn", "distill.baselines=false", "distill.data_free.enabled=false",
             "distill.register_model=false")

# method -> (its overrides, the term name printed in the epoch line)
METHODS = {
    "dkd": (("distill.alpha=0.0", "distill.losses={dkd: 1.0}", "distill.loss_options={dkd: {beta: 2.0}}"), "dkd"),
    "dist": (("distill.alpha=0.0", "distill.losses={dist: 1.0}"), "dist"),
    "hint": (("distill.losses={hint: 1.0}", "distill.hint_layers=[blocks.1, blocks.1]"), "hint"),
    "attention": (("distill.losses={attention: 1.0}", "distill.hint_layers=[blocks.2, blocks.2]"), "attention"),
    "fsp": (("distill.losses={fsp: 1.0}", "distill.layers={fsp: [[blocks.1, blocks.0], [blocks.2, blocks.1]]}"), "fsp"),
    "nst": (("distill.losses={nst: 1.0}", "distill.layers={nst: [blocks.2, blocks.2]}"), "nst"),
    "ft": (("distill.losses={ft: 1.0}", "distill.layers={ft: [blocks.2, blocks.2]}",
            "distill.loss_options={ft: {paraphraser_epochs: 1}}"), "ft"),
    "ab": (("distill.losses={ab: 0.01}", "distill.layers={ab: [blocks.2, blocks.2]}"), "ab"),
    "rkd": (("distill.losses={rkd: 1.0}",), "rkd"),
    "similarity": (("distill.losses={similarity: 1.0}",), "similarity"),
    "pkt": (("distill.losses={pkt: 100.0}",), "pkt"),
    "cc": (("distill.losses={cc: 1.0}", "distill.loss_options={cc: {kernel: bilinear}}"), "cc"),
    "irg": (("distill.losses={irg: 1.0}",), "irg"),
    "crd": (("distill.losses={crd: 0.1}", "distill.loss_options={crd: {negatives: 64, memory_size: 200}}"), "crd"),
    "tagged": (("distill.losses={'hint:b1': 1.0, 'hint:b2': 0.5}",
                "distill.layers={'hint:b1': [blocks.1, blocks.1], 'hint:b2': [blocks.2, blocks.2]}"), "hint:b2"),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store (and working directory) for the module's runs."""
    return tmp_path_factory.mktemp("methods-store")


@pytest.fixture
def run_copy(finished_run, store, tmp_path, monkeypatch):
    """CLI args of ``specdistill distill`` on a private copy of the finished run."""
    monkeypatch.chdir(store)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shutil.copytree(finished_run["path"], tmp_path / "run")

    def args(*extra: str) -> list[str]:
        return ["distill", *finished_run["args"], f"run.dir={tmp_path / 'run'}",
                f"tracking.uri=sqlite:///{store / 'mlflow.db'}", *ONE_EPOCH, *extra]

    return {"args": args, "path": tmp_path / "run"}


def _rows(run) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads((run / "distill" / "results.json").read_text())["rows"]}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_trains_a_student(method, run_copy, capsys):
    overrides, term = METHODS[method]
    assert main(run_copy["args"](*overrides)) == 0
    out = capsys.readouterr().out
    epoch_line = next(line for line in out.splitlines() if "student epoch 1/1" in line)
    assert f" {term} " in epoch_line and "nan" not in epoch_line, epoch_line
    rows = _rows(run_copy["path"])
    assert list(rows) == ["generalist", "ensemble", "same_compute", "student"]
    assert 0 <= rows["student"]["top1"] <= rows["student"]["top5"] <= 1


def test_factor_transfer_trains_its_paraphraser_before_the_student(run_copy, capsys):
    overrides, _ = METHODS["ft"]
    assert main(run_copy["args"](*overrides[:2], "distill.loss_options={ft: {paraphraser_epochs: 3}}")) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "ft paraphraser reconstruction MSE by epoch" in line)
    first, *_, last = (float(v) for v in line.split("epoch")[-1].split())
    assert len(line.split("epoch")[-1].split()) == 3 and last < first
    assert out.index(line) < out.index("student epoch 1/1")


def test_mutual_learning_trains_the_group_and_resumes(run_copy, capsys):
    args = run_copy["args"]("distill.scheme=mutual", "distill.schemes.group_size=3")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "scheme mutual: 3 students learning from each other" in out and "mutual epoch 1/1" in out
    rows = _rows(run_copy["path"])
    assert list(rows) == ["generalist", "ensemble", "same_compute", "student", "mutual_1", "mutual_2", "mutual_3"]
    assert rows["mutual_1"]["teacher"] == "peers (mutual learning, 3 students)"
    assert rows["mutual_1"]["params"] == rows["student"]["params"]
    assert len({rows[f"mutual_{i}"]["top1"] for i in (1, 2, 3)} | {0.5}) >= 2  # not one model thrice
    # killed after the group's epoch was checkpointed, before its rows were written
    scheme = run_copy["path"] / "distill" / "schemes" / "mutual"
    for i in (1, 2, 3):
        (scheme / f"student_{i}" / "row.json").unlink()
    (run_copy["path"] / "distill" / "manifest.json").unlink()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "mutual: resuming after epoch 1" in out and "mutual epoch" not in out
    assert _rows(run_copy["path"])["mutual_2"]["top1"] == rows["mutual_2"]["top1"]


def test_born_again_generations_teach_each_other_and_resume(run_copy, capsys):
    args = run_copy["args"]("distill.scheme=born_again", "distill.schemes.generations=2")
    assert main(args) == 0
    rows = _rows(run_copy["path"])
    assert list(rows)[4:] == ["born_again_1", "born_again_2"]
    assert rows["born_again_1"]["teacher"] == "generalist" and rows["born_again_2"]["teacher"] == "born_again_1"
    assert rows["born_again_1"]["params"] == rows["generalist"]["params"]
    (run_copy["path"] / "distill" / "schemes" / "born_again" / "generation_2" / "row.json").unlink()
    (run_copy["path"] / "distill" / "manifest.json").unlink()
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "born_again_1: finished earlier, kept" in out and "born_again_2: resuming after epoch 1" in out


def test_teacher_assistant_sits_between_the_student_and_the_generalist(run_copy, capsys):
    assert main(run_copy["args"]("distill.scheme=teacher_assistant")) == 0
    rows = _rows(run_copy["path"])
    assert list(rows)[4:] == ["assistant", "assistant_student"]
    assert rows["assistant"]["teacher"] == "ensemble (cache)" and rows["assistant_student"]["teacher"] == "assistant"
    assert rows["student"]["params"] < rows["assistant"]["params"] < rows["generalist"]["params"]
    assert rows["assistant_student"]["params"] == rows["student"]["params"]
    meta = json.loads((run_copy["path"] / "distill" / "schemes" / "teacher_assistant" / "assistant" /
                       "student.json").read_text())
    assert meta["model"]["width"] == pytest.approx((0.125 + 0.25) / 2)


def _fails(args: list[str], capsys, *needles: str) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def test_bad_method_inputs_fail_before_training(run_copy, capsys):
    args = run_copy["args"]
    _fails(args("distill.losses={nst: 1.0}", "distill.layers={nst: [blocks.9, blocks.2]}"), capsys,
           "unknown student layer 'blocks.9'", "available: stem, stem.0, stem.1, blocks, blocks.0, blocks.1, "
           "blocks.2, pool, pool.0, pool.1, head")
    _fails(args("distill.losses={ab: 1.0}", "distill.layers={ab: [blocks.1, blocks.2]}"), capsys,
           "ab: cannot match student map (4, 8, 8, 8) to teacher map (4, 32, 4, 4)")
    _fails(args("distill.losses={fsp: 1.0}", "distill.layers={fsp: [[blocks.0, blocks.0], [blocks.1, blocks.1]]}"),
           capsys, "give (4, 8) matrices but the teacher's", "give (8, 16)")
    _fails(args("distill.losses={crd: 1.0}", "distill.loss_options={crd: {memory_size: 100000}}"), capsys,
           "crd: memory_size=100000 is larger than the training set (216 examples)")
    _fails(args("distill.scheme=mutual", "distill.schemes.group_size=1"), capsys,
           "distill.schemes.group_size", "a group of 1 has no peer")
    _fails(args("distill.losses={fitnet: 1.0}"), capsys,
           "unknown extra loss 'fitnet'; known extra losses: ab, attention, cc, crd, dist, dkd, fsp, ft, hint, "
           "irg, nst, pkt, rkd, similarity")
    _fails(args("distill.scheme=distillation"), capsys,
           "distill.scheme", "'standard', 'mutual', 'born_again' or 'teacher_assistant'")
    _fails(args("distill.losses={dkd: 1.0}", "distill.loss_options={dkd: {tau: 2.0}}"), capsys,
           "bad arguments for loss 'dkd'", "dkd(alpha")
    assert not (run_copy["path"] / "distill" / "manifest.json").exists()
