"""The clustering stage through the CLI: planted groups recovered, review artifacts in MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from sklearn.metrics import adjusted_rand_score

from generalist.data import create_dataset
from orchestration.cli import main

HIERARCHY = (
    "data.name=hierarchy",
    "data.options={train_per_class: 60, holdout_per_class: 20, test_per_class: 10}",
    "generalist.model=cnn_fast", "generalist.width=0.5", "generalist.epochs=4",
    "generalist.batch_size=64", "generalist.optimizer.name=sgd", "generalist.optimizer.lr=0.05",
)


def test_planted_superclasses_recovered_and_reviewable(tiny_args, workdir, capsys):
    assert main(["run", *tiny_args(*HIERARCHY), "--to", "clustering"]) == 0
    record = json.loads((workdir / "run" / "clustering" / "groups.json").read_text())
    truth = create_dataset("hierarchy", train_per_class=1, holdout_per_class=1,
                           test_per_class=1).info["superclass_of"]
    labels = np.full(record["num_classes"], -1)
    for group in record["groups"]:
        labels[group["classes"]] = group["id"]
        assert group["names"] == [record["class_names"][c] for c in group["classes"]]
    assert adjusted_rand_score(truth, labels) >= 0.9
    assert record["n_groups"] == 8, "the selection rule should find the 8 planted super-classes"

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("specdistill")
    run = next(r for r in client.search_runs([exp.experiment_id])
               if r.data.tags.get("specdistill.stage") == "clustering")
    assert run.data.metrics["n_groups"] == 8 and 0 < run.data.metrics["stability_ari"] <= 1
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"groups_table.json", "covariance_heatmap.png", "group_sizes.png", "groups.json"} <= names
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "groups_table.json")).read_text())
    assert set(table["columns"]) >= {"group_id", "size", "classes", "mass_share", "confusion_share"}
    assert len(table["data"]) == 8
    # each group's share of the holdout confusion mass; the 8 disjoint groups together hold the
    # share the stage reports
    confusion = np.load(workdir / "run" / "clustering" / "confusion.npy")
    np.fill_diagonal(confusion, 0.0)
    rows = json.loads((workdir / "run" / "clustering" / "groups_table.json").read_text())
    for row in rows:
        inside = np.ix_(row["class_indices"], row["class_indices"])
        assert row["confusion_share"] == pytest.approx(confusion[inside].sum() / confusion.sum())
    assert sum(r["confusion_share"] for r in rows) == pytest.approx(record["metrics"]["captured_share"])
    heatmap = Image.open(client.download_artifacts(run.info.run_id, "covariance_heatmap.png"))
    assert heatmap.size[0] > 200 and heatmap.size[1] > 200

    capsys.readouterr()
    assert main(["groups", str(workdir / "run")]) == 0
    out = capsys.readouterr().out
    assert "8 groups of 40 classes" in out and "s3_c0, s3_c1, s3_c2, s3_c3, s3_c4" in out


def test_clustering_stage_alone_reuses_the_generalist(tiny_args, capsys):
    assert main(["generalist", *tiny_args()]) == 0
    capsys.readouterr()
    assert main(["clustering", *tiny_args("clustering.n_groups=3", "clustering.stability_seeds=0")]) == 0
    out = capsys.readouterr().out
    assert "skip generalist" in out and "stage clustering" in out and "3 groups" in out


def test_empty_holdout_split_is_a_clear_error(tiny_args, capsys):
    args = tiny_args("data.options={num_superclasses: 3, classes_per_superclass: 3, "
                     "train_per_class: 24, holdout_per_class: 0, test_per_class: 8, image_size: 16}")
    assert main(["run", *args]) == 2
    assert "holdout split is empty" in capsys.readouterr().err


def test_groups_command_on_unknown_run(workdir, capsys):
    assert main(["groups", str(workdir / "nope")]) == 1
    assert "no run directory" in capsys.readouterr().err
