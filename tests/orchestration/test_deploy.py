"""A student ready to deploy: its ONNX export matches torch on the test split, `specdistill
predict` answers from a run directory and from the registry, the registered version has a card."""

from __future__ import annotations

import json
import shutil

import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from generalist.data import create_dataset
from orchestration.checkpoints import load_model
from orchestration.cli import main

DISTILL = ("distill.epochs=1", "distill.batch_size=32", "distill.eval_batch_size=64", "distill.width=0.125",
           "distill.data_free.enabled=false", "distill.baselines=false", "distill.register_model=true")


def _pngs(folder, n: int = 2) -> tuple[list[str], torch.Tensor]:
    data = create_dataset("hierarchy", seed=0, num_superclasses=3, classes_per_superclass=3,
                          train_per_class=24, holdout_per_class=8, test_per_class=8, image_size=16)
    paths = []
    for i in range(n):
        path = folder / f"test_{i}.png"
        Image.fromarray(data.test.images[i, 0].numpy(), mode="L").save(path)
        paths.append(str(path))
    return paths, data.test.images[:n].float() / 255.0


def _predicted(capsys) -> list[list[str]]:
    return [[c["class"] for c in item["top_k"]] for item in json.loads(capsys.readouterr().out)]


def test_onnx_export_predict_and_model_card(finished_run, workdir, capsys):
    run, uri = workdir / "run", f"sqlite:///{workdir / 'mlflow.db'}"
    shutil.copytree(finished_run["path"], run)
    assert main(["run", *finished_run["args"], f"run.dir={run}", f"tracking.uri={uri}", *DISTILL,
                 "--only", "distill"]) == 0
    assert "top-1 agreement 1.0000" in capsys.readouterr().out
    check = json.loads((run / "distill" / "onnx_check.json").read_text())
    assert check["examples"] == 72 and check["same_top1"] and check["max_abs_logit_diff"] < 1e-4
    assert "student.onnx" in json.loads((run / "distill" / "manifest.json").read_text())["outputs"]

    paths, images = _pngs(workdir)
    student, meta = load_model(run / "distill" / "student")
    with torch.no_grad():
        expected = [[meta["class_names"][c] for c in row] for row in student(images).topk(3, dim=1).indices.tolist()]
    assert main(["predict", str(run), *paths, "--top-k", "3", "--json"]) == 0
    assert _predicted(capsys) == expected
    assert main(["predict", "models:/specdistill-student@candidate", *paths, "--top-k", "3", "--json",
                 "--tracking-uri", uri]) == 0
    assert _predicted(capsys) == expected

    card = MlflowClient(uri).get_model_version_by_alias("specdistill-student", "candidate").description
    assert "| student | ensemble (cache) |" in card and "| generalist |" in card
    assert "Classes (9): s0_c0" in card and "train: 216 examples, sha256" in card and "top-1 agreement" in card


def test_predict_names_a_missing_registered_model(workdir, capsys):
    paths, _ = _pngs(workdir, 1)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    assert main(["predict", "models:/nobody@candidate", *paths, "--tracking-uri", uri]) == 2
    assert "cannot load models:/nobody@candidate" in capsys.readouterr().err
