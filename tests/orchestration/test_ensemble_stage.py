"""The ensemble stage, `specdistill report` and `specdistill query` through the CLI entry point,
and the Python query API, on the tiny 9-class hierarchy run (specialists with a frozen trunk)."""

from __future__ import annotations

import json

import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from generalist.data import create_dataset
from orchestration.cli import main
from orchestration.ensemble_api import Ensemble, EnsembleInputError

SPECIALISTS = ("specialists.epochs=1", "specialists.batch_size=32", "specialists.finetune=head",
               "ensemble.batch_size=16")


def _test_split():
    data = create_dataset("hierarchy", seed=0, num_superclasses=3, classes_per_superclass=3,
                          train_per_class=24, holdout_per_class=8, test_per_class=8, image_size=16)
    return data.test


def _write_png(path, image: torch.Tensor) -> str:
    """(C, H, W) uint8 -> PNG file (greyscale for C = 1)."""
    array = image.permute(1, 2, 0).numpy()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(path)
    return str(path)


def _check_mlflow(workdir, evaluation):
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("specdistill")
    run = next(r for r in client.search_runs([exp.experiment_id])
               if r.data.tags.get("specdistill.stage") == "ensemble")
    assert run.info.status == "FINISHED"
    assert run.data.metrics["ensemble_top1"] == pytest.approx(evaluation["ensemble_top1"])
    assert run.data.metrics["generalist_top1"] == pytest.approx(evaluation["generalist_top1"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"evaluation.json", "table4.json", "table4.md"} <= artifacts
    table = json.loads(open(client.download_artifacts(run.info.run_id, "table4.json")).read())
    assert table["columns"][:2] == ["specialists_covering", "n_examples"]
    assert sum(row[1] for row in table["data"]) == evaluation["n_examples"]


def _check_evaluation(run_dir):
    evaluation = json.loads((run_dir / "ensemble" / "evaluation.json").read_text())
    assert evaluation["n_examples"] == 72 and evaluation["shared_trunk"] is True
    assert 0 <= evaluation["generalist_top1"] <= 1 and 0 <= evaluation["ensemble_top1"] <= 1
    table4 = json.loads((run_dir / "ensemble" / "table4.json").read_text())
    assert table4 == evaluation["table4"]
    assert sum(r["n_examples"] for r in table4) == 72
    assert sum(r["n_examples"] for r in table4 if r["specialists_covering"] > 0) == evaluation["n_covered"]
    ens_correct = sum(r["ensemble_correct"] for r in table4)
    assert ens_correct == round(evaluation["ensemble_top1"] * 72)
    return evaluation


def test_run_report_query(tiny_args, workdir, capsys):
    assert main(["run", *tiny_args(*SPECIALISTS), "--to", "ensemble"]) == 0
    out = capsys.readouterr().out
    assert "stage ensemble" in out and "Table 4" in out and "ensemble: test top1 generalist" in out
    run_dir = workdir / "run"
    evaluation = _check_evaluation(run_dir)
    _check_mlflow(workdir, evaluation)

    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"generalist {evaluation['generalist_top1']:.4f} -> ensemble {evaluation['ensemble_top1']:.4f}" in out
    assert "# test examples" in out

    test = _test_split()
    pngs = [_write_png(workdir / f"img{i}.png", test.images[i]) for i in range(3)]
    assert main(["query", str(run_dir), *pngs, "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    ens = Ensemble.load(run_dir)
    assert all(p in out for p in pngs) and any(name in out for name in ens.class_names)
    assert main(["query", str(run_dir), *pngs, "--top-k", "3", "--temperature", "2", "--json"]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert [r["input"] for r in parsed] == pngs and all(len(r["top_k"]) == 3 for r in parsed)
    dense = ens.soft_targets(test.images[:3], temperature=2.0)
    for row, probs in zip(parsed, dense, strict=True):
        best = int(probs.argmax())
        assert row["top_k"][0]["class"] == ens.class_names[best]
        assert row["top_k"][0]["probability"] == pytest.approx(float(probs[best]))

    _check_api(ens, test, pngs)
    _check_bad_inputs(run_dir, workdir, test, capsys)


def _check_api(ens, test, pngs):
    assert len(ens.class_names) == 9 and ens.image_shape == (1, 16, 16)
    probs = ens.soft_targets(test.images)  # uint8 (N, 1, 16, 16)
    assert probs.shape == (72, 9)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(72, dtype=probs.dtype))
    torch.testing.assert_close(ens.soft_targets(test.images.float() / 255), probs)
    torch.testing.assert_close(ens.soft_targets(pngs), probs[:3])  # files == the same tensors
    sharp, flat = ens.soft_targets(test.images[:4], 0.5), ens.soft_targets(test.images[:4], 4.0)
    assert bool((sharp.amax(dim=1) >= flat.amax(dim=1)).all())
    top = ens.soft_targets(test.images[:2], top_k=2)
    assert len(top) == 2 and all(len(r) == 2 and r[0][1] >= r[1][1] for r in top)
    assert top[0][0][0] == ens.class_names[int(probs[0].argmax())]


def _check_bad_inputs(run_dir, workdir, test, capsys):
    ens = Ensemble.load(run_dir)
    with pytest.raises(EnsembleInputError, match=r"\(N, 1, 16, 16\).*got shape \(2, 3, 16, 16\)"):
        ens.soft_targets(test.images[:2].expand(2, 3, 16, 16))  # wrong channel count
    with pytest.raises(EnsembleInputError, match=r"got shape \(2, 1, 8, 8\)"):
        ens.soft_targets(test.images[:2, :, :8, :8])  # wrong size
    with pytest.raises(EnsembleInputError, match=r"top_k must be an integer in \[1, 9\] \(this run has 9 classes\), got 10"):
        ens.soft_targets(test.images[:2], top_k=10)
    with pytest.raises(EnsembleInputError, match="temperature must be a positive"):
        ens.soft_targets(test.images[:2], temperature=0.0)
    big = _write_png(workdir / "big.png", torch.zeros(3, 20, 24, dtype=torch.uint8))
    assert main(["query", str(run_dir), big]) == 2
    err = capsys.readouterr().err
    assert "24x20 pixels but the models expect 16x16" in err
    rgb = _write_png(workdir / "rgb.png", test.images[0].expand(3, 16, 16).contiguous())
    torch.testing.assert_close(ens.soft_targets([rgb]), ens.soft_targets(test.images[:1]))  # RGB -> L

    (run_dir / "specialists" / "specialists.json").unlink()  # an incomplete run
    assert main(["query", str(run_dir), rgb]) == 1
    err = capsys.readouterr().err
    assert "specialists.json is missing" in err and "specdistill run CONFIG" in err
    (run_dir / "ensemble" / "evaluation.json").unlink()
    assert main(["report", str(run_dir)]) == 0  # what did finish is still reported
    out = capsys.readouterr().out
    assert "generalist" in out and "Table 4" not in out


def test_unknown_run_directory(workdir, capsys):
    assert main(["query", str(workdir / "nope"), "a.png"]) == 1
    assert "no run directory at" in capsys.readouterr().err
    assert main(["report", "nope"]) == 1
    assert "no run directory at 'nope'" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="specdistill run CONFIG run.dir="):
        Ensemble.load(workdir / "nope")

