"""The distill stage through the CLI entry point, on a copy of the session's finished tiny run
(9 classes, 1x16x16, ensemble stage done with its soft-target cache): the student and its
baselines, results, MLflow metrics and the registered model, skip on re-run, bad inputs."""

from __future__ import annotations

import json
import shutil

import mlflow
import mlflow.pytorch
import pytest
import torch
from mlflow.tracking import MlflowClient

from generalist.data import create_dataset
from orchestration.checkpoints import load_model
from orchestration.cli import main

TINY_DISTILL = ("distill.epochs=1", "distill.batch_size=32", "distill.eval_batch_size=64",
                "distill.width=0.125", "distill.data_free.enabled=false", "distill.register_model=true")
HINT = ("distill.losses={hint: 1.0}", "distill.hint_layers=[blocks.1, blocks.1]", "distill.student=cnn")


@pytest.fixture
def run_copy(finished_run, workdir):
    """CLI args for a private copy of the finished run, logging to a fresh sqlite store."""
    shutil.copytree(finished_run["path"], workdir / "run")
    uri = f"sqlite:///{workdir / 'mlflow.db'}"

    def args(*extra: str) -> list[str]:
        return ["run", *finished_run["args"], f"run.dir={workdir / 'run'}", f"tracking.uri={uri}",
                *TINY_DISTILL, *extra]

    return {"args": args, "uri": uri, "path": workdir / "run"}


def _test_images() -> torch.Tensor:
    data = create_dataset("hierarchy", seed=0, num_superclasses=3, classes_per_superclass=3,
                          train_per_class=24, holdout_per_class=8, test_per_class=8, image_size=16)
    return data.test.images.float() / 255.0


def _stage_run(uri: str):
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("specdistill")
    return client, next(r for r in client.search_runs([exp.experiment_id])
                        if r.data.tags.get("specdistill.stage") == "distill")


def test_distill_with_baselines_registers_the_student_and_skips_on_rerun(run_copy, capsys):
    assert main([*run_copy["args"](*HINT), "--only", "distill"]) == 0
    out = capsys.readouterr().out
    assert "3.9x fewer than the generalist" in out and "extra loss hint" in out
    assert "student epoch 1/1" in out and "hard_labels epoch 1/1" in out and "generalist_kd epoch 1/1" in out
    assert "distill: student test top1" in out and "registered version 1" in out

    stage = run_copy["path"] / "distill"
    rows = {r["name"]: r for r in json.loads((stage / "results.json").read_text())["rows"]}
    assert list(rows) == ["generalist", "ensemble", "same_compute", "student", "hard_labels", "generalist_kd"]
    assert rows["student"]["teacher"] == "ensemble (cache)" and rows["hard_labels"]["alpha"] == 0.0
    for row in rows.values():
        assert 0 <= row["top1"] <= row["top5"] <= 1 and row["latency_ms"] > 0
    assert rows["student"]["params"] == rows["hard_labels"]["params"] < rows["generalist"]["params"] / 3
    assert rows["ensemble"]["params"] > rows["generalist"]["params"]
    generalist = json.loads((run_copy["path"] / "generalist" / "metrics.json").read_text())
    evaluation = json.loads((run_copy["path"] / "ensemble" / "evaluation.json").read_text())
    assert rows["generalist"]["top1"] == generalist["test_top1"]
    assert rows["ensemble"]["top1"] == evaluation["ensemble_top1"]
    table = (stage / "results.md").read_text()
    assert table.count("\n") == 8 and "| student | ensemble (cache) |" in table  # header, rule, 6 rows
    for folder in ("", "baselines/hard_labels/", "baselines/generalist_kd/"):
        assert (stage / f"{folder}student.safetensors").exists() and (stage / f"{folder}student.json").exists()

    client, run = _stage_run(run_copy["uri"])
    assert run.info.status == "FINISHED"
    for key in ("student/train_loss", "student/soft", "student/hint", "student/holdout_top1",
                "hard_labels/ce", "generalist_kd/soft", "student/test_top1", "compression"):
        assert key in run.data.metrics, key
    assert {"results.json", "results.md"} <= {a.path for a in client.list_artifacts(run.info.run_id)}

    saved, meta = load_model(stage / "student")
    record = json.loads((stage / "registry.json").read_text())
    assert record["alias_uri"] == "models:/specdistill-student@candidate" and record["version"] == "1"
    images = _test_images()
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(run_copy["uri"])
    try:
        registered = mlflow.pytorch.load_model("models:/specdistill-student@candidate")
        info = mlflow.models.get_model_info("models:/specdistill-student@candidate")
    finally:
        mlflow.set_tracking_uri(previous)
    with torch.no_grad():
        torch.testing.assert_close(registered(images), saved(images))
    assert info.metadata["class_names"] == meta["class_names"] and len(meta["class_names"]) == 9
    version = client.get_model_version_by_alias("specdistill-student", "candidate")
    assert str(version.version) == "1" and version.run_id == run.info.run_id

    assert main(run_copy["args"](*HINT)) == 0
    assert "skip distill: finished earlier, manifest matches" in capsys.readouterr().out

    # killed after the baselines finished and the student's epoch was checkpointed: resume
    (stage / "manifest.json").unlink()
    (stage / "row.json").unlink()
    assert main(run_copy["args"](*HINT)) == 0
    out = capsys.readouterr().out
    assert "stage distill (no manifest)" in out and "student: resuming after epoch 1" in out
    assert "hard_labels: finished earlier, kept" in out and "hard_labels epoch" not in out
    assert "registered version 2" in out


def test_online_targets_and_data_free_row(run_copy, capsys, monkeypatch):
    import distill.latency as latency_module
    import orchestration.stages.distill as stage_module

    calls = []  # (predictor, ms, grad enabled) of every latency measurement, in order

    def spy(predict, example, **kw):
        ms = measure(predict, example, **kw)
        calls.append((predict, ms, torch.is_grad_enabled()))
        return ms

    measure = latency_module.measure_latency_ms
    monkeypatch.setattr(latency_module, "measure_latency_ms", spy)
    args = run_copy["args"]("distill.targets=online", "distill.baselines=false", "distill.register_model=false",
                            "distill.data_free.enabled=true", "distill.data_free.generator_steps=3",
                            "distill.data_free.steps_per_epoch=3")
    assert main([*args, "--only", "distill"]) == 0
    out = capsys.readouterr().out
    assert "data_free generator step 3/3" in out and "data_free student step 3/3" in out
    stage = run_copy["path"] / "distill"
    rows = {r["name"]: r for r in json.loads((stage / "results.json").read_text())["rows"]}
    assert list(rows) == ["generalist", "ensemble", "same_compute", "student", "data_free"]
    assert rows["student"]["teacher"] == "ensemble (online)"
    assert rows["data_free"]["teacher"] == "ensemble on generated images (DAFL)"
    assert rows["data_free"]["params"] == rows["student"]["params"]
    assert (stage / "baselines" / "data_free" / "student.safetensors").exists()
    assert not (stage / "registry.json").exists()
    _, run = _stage_run(run_copy["uri"])
    assert "data_free/generator_loss" in run.data.metrics and "data_free/test_top1" in run.data.metrics
    assert run.data.metrics["data_free/test_latency_ms"] == pytest.approx(rows["data_free"]["latency_ms"])

    # The table's latencies: every model measured side by side at the end, round-robin, each the
    # median of its rounds (no autograd); the same-compute generalist has the generalist's.
    timed = [name for name in rows if name != "same_compute"]
    rounds, n = stage_module.LATENCY_ROUNDS, len(timed)
    assert len(calls) == rounds * n  # measured once per model, not again after each training
    final = calls
    order = [id(p) for p, _, _ in final[:n]]
    assert len(set(order)) == n
    assert all([id(p) for p, _, _ in final[r * n:(r + 1) * n]] == order for r in range(rounds))
    assert not any(grad for _, _, grad in final)
    for i, name in enumerate(timed):
        assert rows[name]["latency_ms"] == pytest.approx(sorted(ms for _, ms, _ in final[i::n])[rounds // 2])
    assert rows["same_compute"]["latency_ms"] == rows["generalist"]["latency_ms"]


def _fails(args: list[str], capsys, *needles: str) -> tuple[str, str]:
    assert main(args) == 2
    out, err = capsys.readouterr()
    for needle in needles:
        assert needle in err, (needle, err)
    return out, err


def test_bad_inputs_fail_before_training(run_copy, capsys):
    args = run_copy["args"]
    _fails([*args("distill.temperature=0"), "--only", "distill"], capsys,
           "distill.temperature", "greater than 0")
    _fails([*args("distill.alpha=1.5"), "--only", "distill"], capsys, "distill.alpha", "less than or equal to 1")
    _fails([*args("distill.losses={fitnet: 1.0}"), "--only", "distill"], capsys,
           "unknown extra loss 'fitnet'; known extra losses: ab, attention, cc, crd, dist, dkd, fsp, ft, hint, "
           "irg, nst, pkt, rkd, similarity")
    out, err = _fails([*args("distill.losses={hint: 1.0}", "distill.hint_layers=[blocks.1, blocks.2]",
                             "distill.student=cnn"),
                       "--only", "distill"], capsys,
                      "(4, 8, 8, 8)", "(4, 32, 4, 4)", "student blocks.1", "teacher blocks.2")
    assert "spatial sizes" in err and "stage distill" in out and "epoch" not in out

    # the cache was built for the fixture's data: 24 training examples per class, 9 classes
    other = "data.options={num_superclasses: 3, classes_per_superclass: 3, train_per_class: 20, " \
            "holdout_per_class: 8, test_per_class: 8, image_size: 16}"
    _fails([*args(other), "--only", "distill"], capsys, "soft-target cache", "other data options",
           "train_per_class", "rebuild", "distill.targets=online")
    manifest = run_copy["path"] / "ensemble" / "cache" / "manifest.json"
    record = json.loads(manifest.read_text())
    record["class_names"][0] = "not-a-class"
    manifest.write_text(json.dumps(record))
    _fails([*args(), "--only", "distill"], capsys, "another class list", "not-a-class", "rebuild")
    shutil.rmtree(manifest.parent)
    _fails([*args(), "--only", "distill"], capsys, "no soft-target cache", "distill.targets=online")
    assert not (run_copy["path"] / "distill" / "manifest.json").exists()


def test_an_interrupted_data_free_row_resumes_from_its_last_chunk(run_copy, capsys):
    args = run_copy["args"]("distill.baselines=false", "distill.register_model=false",
                            "distill.data_free.enabled=true", "distill.data_free.generator_steps=3",
                            "distill.data_free.steps_per_epoch=2")
    assert main([*args, "--only", "distill"]) == 0
    row_dir = run_copy["path"] / "distill" / "baselines" / "data_free"
    first = json.loads((row_dir / "row.json").read_text())
    checkpoints = row_dir / "checkpoints"
    assert json.loads((checkpoints / "latest.json").read_text())["epoch"] == 3 + 2  # distill.epochs=1
    # As if killed after the last chunk was saved but before the row was written.
    (row_dir / "row.json").unlink()
    (run_copy["path"] / "distill" / "manifest.json").unlink()
    capsys.readouterr()
    assert main([*args, "--only", "distill"]) == 0
    out = capsys.readouterr().out
    assert "data_free: resuming after 3 generator and 2 student steps" in out
    assert "data_free student step" not in out
    assert json.loads((row_dir / "row.json").read_text())["top1"] == first["top1"]
