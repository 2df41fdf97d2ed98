"""Re-runs of a run directory through the CLI: damaged outputs are retrained from their last good
state, a config or data change sets the finished results aside (RUN/history/) and says what
changed, a corrupt manifest is named, and a stage whose outputs come out the same leaves its
downstream stages finished.

The tests work on copies of the session's finished tiny run (and of one with the distill stage
done, made once for the module), with the MLflow store copied along."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from orchestration.artifacts import load_generalist
from orchestration.checkpoints import load_model
from orchestration.cli import main

DISTILL = ("distill.epochs=1", "distill.batch_size=32", "distill.eval_batch_size=64", "distill.width=0.125",
           "distill.data_free.enabled=true", "distill.data_free.generator_steps=4",
           "distill.data_free.steps_per_epoch=2", "distill.data_free.batch_size=8",
           "distill.data_free.latent_dim=8", "distill.register_model=false")
TWO_SUPERCLASSES = ("data.options={num_superclasses: 2, classes_per_superclass: 3, train_per_class: 24, "
                    "holdout_per_class: 8, test_per_class: 8, image_size: 16}")


@pytest.fixture(scope="module")
def distilled(finished_run, tmp_path_factory):
    """The finished tiny run with its distill stage done too (student, baselines, data-free row)."""
    root = tmp_path_factory.mktemp("distilled")
    shutil.copytree(finished_run["path"], root / "run")
    shutil.copy(finished_run["root"] / "mlflow.db", root / "mlflow.db")
    args = [*finished_run["args"], f"run.dir={root / 'run'}", f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
            *DISTILL]
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["run", *args]) == 0
    finally:
        os.chdir(cwd)
    return {"root": root, "args": args}


def _copy(source_root: Path, args: list[str], workdir: Path) -> tuple[Path, list[str]]:
    """A private copy of a run and its MLflow store (run.json pointing at the copied store);
    CLI args for the copy."""
    shutil.copytree(source_root / "run", workdir / "run")
    shutil.copy(source_root / "mlflow.db", workdir / "mlflow.db")
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    record = workdir / "run" / "run.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "tracking_uri": uri}))
    return workdir / "run", [*args, f"run.dir={workdir / 'run'}", f"tracking.uri={uri}"]


# ----------------------------------------------------------------------------- 1: damaged outputs
def test_damaged_students_are_retrained_from_their_last_checkpoint(distilled, workdir, capsys):
    run, args = _copy(distilled["root"], distilled["args"], workdir)
    stage = run / "distill"
    os.truncate(stage / "student.safetensors", 10)
    (stage / "baselines" / "hard_labels" / "student.safetensors").unlink()
    os.truncate(stage / "baselines" / "data_free" / "student.safetensors", 100)
    assert main(["run", *args]) == 0
    out = capsys.readouterr().out
    assert "stage distill (output" in out
    assert f"student: checkpoint {stage / 'student.safetensors'} is corrupt or truncated" in out
    assert f"hard_labels: checkpoint {stage / 'baselines/hard_labels/student.safetensors'} is missing" in out
    assert "data_free: checkpoint" in out and out.count("training it again from its last checkpoint") == 3
    assert "generalist_kd: finished earlier, kept" in out
    assert "student epoch 1/1" not in out  # resumed after its last epoch: nothing trained twice
    for folder in ("", "baselines/hard_labels", "baselines/data_free", "baselines/generalist_kd"):
        model, meta = load_model(stage / folder / "student")
        assert meta["model"]["num_classes"] == 9
    assert main(["run", *args]) == 0
    assert "skip distill: finished earlier" in capsys.readouterr().out


def test_a_truncated_specialist_is_retrained(finished_run, workdir, capsys):
    run, args = _copy(finished_run["root"], finished_run["args"], workdir)
    os.truncate(run / "specialists" / "group_001" / "model.safetensors", 10)
    assert main(["run", *args, "--to", "specialists"]) == 0
    out = capsys.readouterr().out
    assert "stage specialists (output group_001/model.safetensors changed or corrupt)" in out
    n_groups = len(json.loads((run / "clustering" / "groups.json").read_text())["groups"])
    assert f"{n_groups - 1} finished earlier, 1 to train" in out and "done group 1:" in out
    assert main(["run", *args, "--to", "ensemble"]) == 0  # its downstream stage loads it
    assert "error" not in capsys.readouterr().err


# ----------------------------------------------------------------------------- 2: config changes
def test_a_config_change_sets_finished_results_aside_and_links_the_parent_runs(finished_run, workdir, capsys):
    run, args = _copy(finished_run["root"], finished_run["args"], workdir)
    before = json.loads((run / "run.json").read_text())["mlflow_run_id"]
    weights = (run / "generalist" / "model.safetensors").read_bytes()
    assert main(["run", *args, TWO_SUPERCLASSES, "run.seed=5", "--to", "clustering"]) == 0
    out = capsys.readouterr().out
    assert ("data.options.num_superclasses 3 -> 2, run.seed 0 -> 5; re-runs generalist, clustering; their "
            f"finished outputs move to {run / 'history'}/<stage>/ (run.keep_history=3)") in out
    assert "stage generalist (config changed)\n  changed: data.options.num_superclasses 3 -> 2, run.seed 0 -> 5" in out
    entries = {stage: list((run / "history" / stage).iterdir()) for stage in ("generalist", "clustering")}
    assert [len(e) for e in entries.values()] == [1, 1]
    old = entries["generalist"][0]
    assert f"the finished generalist result it replaces was moved to {old}" in out
    assert (old / "model.safetensors").read_bytes() == weights
    record = json.loads((old / "archived.json").read_text())
    assert record["changes"] == [["data.options.num_superclasses", 3, 2], ["run.seed", 0, 5]]
    assert record["mlflow_parent_run_id"] == before
    assert len(load_generalist(run)[1]["class_names"]) == 6
    assert (run / "specialists" / "group_000" / "model.safetensors").exists()  # not re-run: kept as it was

    after = json.loads((run / "run.json").read_text())
    assert after["previous_mlflow_run_id"] == before != after["mlflow_run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    assert client.get_run(after["mlflow_run_id"]).data.tags["specdistill.previous_parent_run_id"] == before
    assert client.get_run(before).data.tags["specdistill.next_parent_run_id"] == after["mlflow_run_id"]

    for seed in (6, 7):  # at most run.keep_history results per stage, the oldest dropped
        assert main(["run", *args, TWO_SUPERCLASSES, f"run.seed={seed}", "run.keep_history=2",
                     "--only", "generalist"]) == 0
    kept = sorted(json.loads((p / "archived.json").read_text())["changes"][-1][1]
                  for p in (run / "history" / "generalist").iterdir())
    assert kept == [5, 6]


# ----------------------------------------------------------------------------- 3: changed data
def _image_folder(root: Path, classes: int) -> None:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
        for i in range(6):
            pixels = np.clip(rng.normal(40 * c + 30, 20, (8, 8)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class_{c}" / f"{i}.png")


def test_changed_image_folder_data_reruns_what_depends_on_it(tiny_args, workdir, capsys):
    data = workdir / "images"
    _image_folder(data, 3)
    args = [*tiny_args(), "data.name=image_folder", f"data.root={data}",
            "data.options={image_size: 8, channels: 1, holdout_fraction: 0.25, test_fraction: 0.25}",
            "generalist.epochs=1"]
    assert main(["generalist", *args]) == 0
    assert main(["generalist", *args]) == 0
    assert "skip generalist" in capsys.readouterr().out
    _image_folder(data, 4)  # a class folder added
    assert main(["generalist", *args]) == 0
    out = capsys.readouterr().out
    assert f"stage generalist (data changed)\n  changed: the data under {data}" in out
    assert load_generalist(workdir / "run")[1]["class_names"] == [f"class_{c}" for c in range(4)]

    content = [*args, "data.verify_content=true"]  # identity by content: a touched file is the same data
    assert main(["generalist", *content]) == 0
    os.utime(data / "class_0" / "0.png", (1, 1))
    capsys.readouterr()
    assert main(["generalist", *content]) == 0
    assert "skip generalist" in capsys.readouterr().out
    assert main(["generalist", *args]) == 0  # by modification time it changed
    assert "stage generalist (data changed)" in capsys.readouterr().out


# ----------------------------------------------------------------------------- 4: manifests
def test_a_corrupt_manifest_is_named_and_an_unchanged_rerun_keeps_downstream(finished_run, workdir, capsys):
    run, args = _copy(finished_run["root"], finished_run["args"], workdir)
    manifest = run / "generalist" / "manifest.json"
    good = json.loads(manifest.read_text())
    manifest.write_text("{broken")
    assert main(["run", *args, "--only", "clustering"]) == 1
    err = capsys.readouterr().err
    assert f"manifest {manifest} is corrupt: not valid JSON" in err and "must run again" in err

    assert main(["run", *args, "--to", "ensemble"]) == 0
    out = capsys.readouterr().out
    assert f"stage generalist (manifest {manifest} is corrupt: not valid JSON" in out
    assert "resuming after epoch 2" in out
    for stage in ("clustering", "specialists", "ensemble"):  # the generalist came out the same
        assert f"skip {stage}: finished earlier" in out
    rewritten = json.loads(manifest.read_text())
    assert rewritten["outputs"]["model.safetensors"] == good["outputs"]["model.safetensors"]
    assert rewritten["outputs"]["metrics.json"] != good["outputs"]["metrics.json"]  # its latency differs

    manifest.write_text(json.dumps({**good, "outputs": list(good["outputs"])}))
    assert main(["run", *args, "--to", "ensemble"]) == 0
    out = capsys.readouterr().out
    assert (f"stage generalist (manifest {manifest} is corrupt: field 'outputs' must be a JSON object, "
            "got ['metrics.json'") in out
    assert "skip clustering: finished earlier" in out
