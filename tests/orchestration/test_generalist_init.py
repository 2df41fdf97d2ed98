"""Bring your own generalist (``generalist.init``): from an earlier run's weights or the MLflow
registry the pipeline makes the same groups; weights that do not fit or cannot be read safely are
refused with the reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from orchestration.artifacts import load_generalist
from orchestration.cli import main
from orchestration.files import sha256_file


def _args(finished_run, tmp_path: Path, *extra: str, to: str = "clustering") -> list[str]:
    keep = [a for a in finished_run["args"] if not a.startswith(("run.dir=", "tracking.uri="))]
    return ["run", f"run.dir={tmp_path / 'run'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *keep,
            *extra, "--to", to]


def _groups(run: Path) -> list[list[int]]:
    return [g["classes"] for g in json.loads((run / "clustering" / "groups.json").read_text())["groups"]]


def _weights(finished_run) -> Path:
    return finished_run["path"] / "generalist" / "model.safetensors"


def test_an_earlier_runs_generalist_gives_the_same_groups(finished_run, tmp_path, workdir, capsys):
    weights = _weights(finished_run)
    assert main(_args(finished_run, tmp_path, f"generalist.init={weights}")) == 0
    assert "evaluated as it is, no training" in capsys.readouterr().out
    assert _groups(tmp_path / "run") == _groups(finished_run["path"])
    _, meta = load_generalist(tmp_path / "run")
    assert meta["init"]["sha256"] == sha256_file(weights) and meta["metrics"]["epochs_trained"] == 0


def _register(uri: str, folder: Path, name: str, alias: str) -> None:
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("models")
    run = client.create_run(exp)
    for file in ("model.safetensors", "model.json"):
        client.log_artifact(run.info.run_id, str(folder / file), "generalist")
    client.create_registered_model(name)
    version = client.create_model_version(name, f"{run.info.artifact_uri}/generalist", run_id=run.info.run_id)
    client.set_registered_model_alias(name, alias, version.version)


def test_a_registered_generalist_gives_the_same_groups(finished_run, tmp_path, workdir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _register(uri, finished_run["path"] / "generalist", "tiny-generalist", "champion")
    assert main(_args(finished_run, tmp_path, "generalist.init=models:/tiny-generalist@champion")) == 0
    assert _groups(tmp_path / "run") == _groups(finished_run["path"])
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("specdistill")
    stage = next(r for r in client.search_runs([exp.experiment_id])
                 if r.data.tags.get("specdistill.stage") == "generalist")
    assert stage.data.tags["specdistill.generalist_sha256"] == sha256_file(_weights(finished_run))
    assert stage.data.tags["specdistill.generalist_source"] == "models:/tiny-generalist@champion"


@pytest.mark.parametrize(("source", "message"), [
    ("models:/nobody@champion", "there is no registered model 'nobody'"),
    ("models:/tiny-generalist@staging", "has no alias 'staging' (its aliases: champion)"),
])
def test_a_missing_registered_model_or_alias_is_named(finished_run, tmp_path, workdir, capsys, source, message):
    _register(f"sqlite:///{tmp_path / 'mlflow.db'}", finished_run["path"] / "generalist", "tiny-generalist",
              "champion")
    assert main(_args(finished_run, tmp_path, f"generalist.init={source}")) == 1
    assert message in capsys.readouterr().err


def test_other_class_count_names_both(finished_run, tmp_path, workdir, capsys):
    args = _args(finished_run, tmp_path, f"generalist.init={_weights(finished_run)}")
    assert main([a.replace("num_superclasses: 3", "num_superclasses: 2") for a in args]) == 1
    err = capsys.readouterr().err
    assert "was made for 9 classes" in err and "the data has 6 classes" in err


def test_other_class_count_without_metadata_names_both(finished_run, tmp_path, workdir, capsys):
    bare = tmp_path / "bare.pt"
    model, _ = load_generalist(finished_run["path"])
    torch.save(model.state_dict(), bare)
    args = _args(finished_run, tmp_path, f"generalist.init={bare}")
    assert main([a.replace("num_superclasses: 3", "num_superclasses: 2") for a in args]) == 1
    err = capsys.readouterr().err
    assert "predicts 9 classes" in err and "the data has 6 classes" in err


def test_a_corrupt_checkpoint_is_refused(finished_run, tmp_path, workdir, capsys):
    broken = tmp_path / "model.safetensors"
    broken.write_bytes(_weights(finished_run).read_bytes()[:200])
    assert main(_args(finished_run, tmp_path, f"generalist.init={broken}")) == 1
    assert "is corrupt or truncated" in capsys.readouterr().err


def test_a_pickled_whole_model_is_refused_not_unpickled(finished_run, tmp_path, workdir, capsys):
    pickled = tmp_path / "whole.pt"
    model, _ = load_generalist(finished_run["path"])
    torch.save(model, pickled)
    assert main(_args(finished_run, tmp_path, f"generalist.init={pickled}")) == 1
    err = capsys.readouterr().err
    assert "is refused: it holds pickled Python objects" in err and "state_dict()" in err


def test_finetuning_starts_from_the_brought_weights(finished_run, tmp_path, workdir, capsys):
    copy = tmp_path / "init"
    shutil.copytree(finished_run["path"] / "generalist", copy)
    assert main(_args(finished_run, tmp_path, f"generalist.init={copy / 'model.safetensors'}",
                      "generalist.init_mode=finetune", "generalist.epochs=1", to="generalist")) == 0
    assert "fine-tuned from there" in capsys.readouterr().out
    _, meta = load_generalist(tmp_path / "run")
    assert meta["metrics"]["epochs_trained"] == 1 and meta["init"]["source"].endswith("model.safetensors")


def _resnet18(in_channels: int):
    import torchvision

    raw = torchvision.models.resnet18(num_classes=9)
    raw.conv1 = torch.nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return raw


def test_a_torchvision_state_dict_from_a_local_file(finished_run, tmp_path, workdir, capsys):
    raw = _resnet18(in_channels=1)                     # the data's grey images
    torch.save(raw.state_dict(), tmp_path / "resnet18.pth")
    assert main(_args(finished_run, tmp_path, "generalist.model=tv.resnet18", "generalist.width=1.0",
                      f"generalist.init={tmp_path / 'resnet18.pth'}", to="generalist")) == 0
    model, meta = load_generalist(tmp_path / "run")
    torch.testing.assert_close(model.head.weight, raw.fc.weight)
    torch.testing.assert_close(model.stem[1].weight, raw.conv1.weight)   # stem[0] normalises
    assert meta["init"]["sha256"] == sha256_file(tmp_path / "resnet18.pth")


def test_a_torchvision_state_dict_for_other_images_names_both(finished_run, tmp_path, workdir, capsys):
    torch.save(_resnet18(in_channels=3).state_dict(), tmp_path / "resnet18.pth")
    assert main(_args(finished_run, tmp_path, "generalist.model=tv.resnet18", "generalist.width=1.0",
                      f"generalist.init={tmp_path / 'resnet18.pth'}", to="generalist")) == 1
    err = capsys.readouterr().err
    assert "takes 3-channel images" in err and "1x16x16 images" in err
