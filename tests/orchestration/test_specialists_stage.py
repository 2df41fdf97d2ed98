"""The specialists stage on a real local Ray: parallel training, a killed worker, MLflow child
runs, re-runs that never retrain a finished specialist, and every bad input it must refuse.

One generalist + clustering run (9 classes, 3 groups) is made once for the module; each test
works on its own copy. Ray is started once (2 CPUs) and, like the stage's own, stays up for the
rest of the test session.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import ray
import torch
from mlflow.tracking import MlflowClient

from generalist.data import create_dataset
from orchestration.artifacts import load_specialist
from orchestration.cli import main
from orchestration.config import load_config
from orchestration.specialist_job import SpecialistJob, train_specialist

TINY = (
    "run.device=cpu", "run.num_threads=1", "data.name=hierarchy",
    "data.options={num_superclasses: 3, classes_per_superclass: 3, train_per_class: 24, "
    "holdout_per_class: 8, test_per_class: 8, image_size: 16}",
    "generalist.model=cnn", "generalist.width=0.25", "generalist.epochs=2",
    "generalist.batch_size=32", "generalist.optimizer.name=sgd", "generalist.optimizer.lr=0.05",
    "clustering.affinity=covariance",  # the tiny generalist's confusions are noise: group its covariance
)
# Long enough epochs (~1 s) that a worker can be killed between two checkpoints.
SPECIALISTS = ("specialists.epochs=4", "specialists.patience=4", "specialists.batch_size=32",
               "specialists.num_batches=60", "specialists.finetune=all")


def _args(root: Path, *extra: str) -> list[str]:
    return [f"run.dir={root / 'run'}", f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
            *TINY, *SPECIALISTS, *extra]


@pytest.fixture(scope="module")
def local_ray():
    """Ray with 2 CPUs for this module (or the one an earlier test's stage left running)."""
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """A run dir with a trained generalist and its groups (no specialists yet)."""
    root = tmp_path_factory.mktemp("upstream")
    for stage in ("generalist", "clustering"):
        assert main([stage, *_args(root)]) == 0
    return root


@pytest.fixture
def copy_of(upstream, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shutil.copytree(upstream / "run", tmp_path / "run")
    shutil.copy(upstream / "mlflow.db", tmp_path / "mlflow.db")
    return tmp_path


@pytest.fixture(scope="module")
def trained(upstream, local_ray, tmp_path_factory):
    """The specialists stage run once, with group 0's worker SIGKILLed after its first epoch."""
    root = tmp_path_factory.mktemp("trained")
    shutil.copytree(upstream / "run", root / "run")
    shutil.copy(upstream / "mlflow.db", root / "mlflow.db")
    group_dir = root / "run" / "specialists" / "group_000"
    killer = _Killer(group_dir)
    killer.start()
    started = time.perf_counter()
    code = main(["run", "--to", "specialists", *_args(root)])
    seconds = time.perf_counter() - started
    killer.join(timeout=5)
    return {"root": root, "code": code, "killed": killer.killed, "seconds": seconds}


class _Killer(threading.Thread):
    """SIGKILLs the worker training ``group_dir`` as soon as its first epoch checkpoint exists."""

    def __init__(self, group_dir: Path):
        super().__init__(daemon=True)
        self.group_dir, self.killed = group_dir, None

    def run(self) -> None:
        state = self.group_dir / "checkpoints" / "latest.json"
        deadline = time.time() + 240
        while not state.exists() and time.time() < deadline:
            time.sleep(0.01)
        pid = int((self.group_dir / "worker.pid").read_text())
        if not (self.group_dir / "model.json").exists():
            os.kill(pid, signal.SIGKILL)
            self.killed = pid


def _specialist_runs(root: Path):
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("specdistill")
    runs = client.search_runs([exp.experiment_id])
    return client, runs, [r for r in runs if "specdistill.group_id" in r.data.tags]


def test_a_killed_worker_resumes_and_every_specialist_finishes(trained):
    assert trained["code"] == 0 and trained["killed"] is not None
    stage = trained["root"] / "run" / "specialists"
    groups = json.loads((trained["root"] / "run" / "clustering" / "groups.json").read_text())["groups"]
    assert len(groups) >= 2
    for group in groups:
        meta = json.loads((stage / f"group_{group['id']:03d}" / "model.json").read_text())
        assert meta["metrics"]["epochs_trained"] == 4 and len(meta["history"]) == 4
    killed = json.loads((stage / "group_000" / "model.json").read_text())
    assert killed["resumed_from_epochs"] and killed["resumed_from_epochs"][0] >= 1
    assert int((stage / "group_000" / "worker.pid").read_text()) != trained["killed"]
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["metrics"]["n_resumed"] >= 1
    assert {f"group_{g['id']:03d}/model.safetensors" for g in groups} <= set(manifest["outputs"])


def test_specialists_are_prior_corrected_and_keep_the_init_invariant(trained):
    stage = trained["root"] / "run" / "specialists"
    index = json.loads((stage / "specialists.json").read_text())
    for entry in index["specialists"]:
        model, meta = load_specialist(stage / entry["dir"])
        pi = meta["pi_m"]
        assert pi == pytest.approx(len(entry["classes"]) / 9)
        assert model.prior_correction == pytest.approx(math.log((1 - pi) / pi), abs=1e-6)
        assert meta["specialist"]["classes"] == entry["classes"] and model.group == tuple(entry["classes"])
        assert meta["metrics"]["init_invariant_maxdiff"] <= 1e-5
        assert model(torch.rand(2, 1, 16, 16)).shape == (2, len(entry["classes"]) + 1)


def test_each_specialist_is_an_mlflow_child_run_of_the_pipeline_run(trained):
    client, runs, specialists = _specialist_runs(trained["root"])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    groups = json.loads((trained["root"] / "run" / "clustering" / "groups.json").read_text())["groups"]
    assert sorted(int(r.data.tags["specdistill.group_id"]) for r in specialists) == [g["id"] for g in groups]
    for run in specialists:
        group = groups[int(run.data.tags["specdistill.group_id"])]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["specdistill.group_size"] == str(len(group["classes"]))
        assert run.data.tags["specdistill.class_names"] == ", ".join(group["names"])
        assert run.info.status == "FINISHED" and "prior_correction" in run.data.metrics
        steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "holdout_loss")})
        assert steps == [0, 1, 2, 3, 4]


def test_rerun_never_retrains_a_finished_specialist(trained, capsys):
    root = trained["root"]
    assert main(["run", "--to", "specialists", *_args(root)]) == 0
    assert "skip specialists" in capsys.readouterr().out
    (root / "run" / "specialists" / "manifest.json").unlink()
    (root / "run" / "specialists" / "group_001" / "model.json").unlink()
    _, _, before = _specialist_runs(root)
    assert main(["run", "--to", "specialists", *_args(root)]) == 0
    out = capsys.readouterr().out
    assert "finished earlier, 1 to train" in out
    assert "done group 1" in out and "done group 0" not in out
    _, _, after = _specialist_runs(root)
    assert len(after) == len(before), "a retrained specialist reuses its MLflow child run"


def _edit_groups(root: Path, edit) -> None:
    path = root / "run" / "clustering" / "groups.json"
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda r: r["groups"][0]["classes"].__setitem__(0, 42), "out of range"),
    (lambda r: r["groups"][0]["names"].reverse(), "names"),
    (lambda r: r.update(num_classes=12), "differ from the generalist's 9"),
    (lambda r: r["groups"][1].update(classes=[], names=[]), "is empty"),
    (lambda r: r["groups"][0].update(classes=list(range(9)), names=r["class_names"]), "dustbin"),
], ids=["id-out-of-range", "ids-name-other-classes", "other-class-count", "empty-group", "every-class"])
def test_bad_groups_file_is_refused_before_training(copy_of, edit, message, capsys):
    _edit_groups(copy_of, edit)
    assert main(["specialists", *_args(copy_of)]) == 2
    err = capsys.readouterr().err
    assert message in err and "clustering" in err
    assert not list((copy_of / "run" / "specialists").glob("group_*/checkpoints"))


def test_missing_generalist_checkpoint_says_to_train_it(copy_of, capsys):
    (copy_of / "run" / "generalist" / "model.safetensors").unlink()
    assert main(["specialists", *_args(copy_of)]) == 1
    err = capsys.readouterr().err
    assert "model.safetensors is missing" in err and "the generalist stage of run" in err
    assert "specdistill run CONFIG" in err


def test_more_gpus_than_the_cluster_has_fails_fast(copy_of, local_ray, capsys):
    """Fails before any specialist is set up or submitted (Ray would keep such a task pending
    forever): no group folder, no child MLflow run."""
    assert main(["specialists", *_args(copy_of, "specialists.gpus_per_specialist=1")]) == 2
    err = capsys.readouterr().err
    assert "no GPUs" in err and "specialists.gpus_per_specialist" in err
    assert not list((copy_of / "run" / "specialists").glob("group_*"))
    assert _specialist_runs(copy_of)[2] == []


def test_reinit_blocks_trains_specialists_whose_last_block_starts_afresh(copy_of, trained, local_ray, capsys):
    """``specialists.reinit_blocks=1`` through the CLI: every specialist's earlier blocks are the
    generalist's fine-tuned, its last block is trained from a fresh start (far from the
    generalist's), its dustbin rows train, and the saved specialist loads back as it was trained."""
    from orchestration.artifacts import load_generalist

    fast = ("specialists.epochs=1", "specialists.num_batches=4", "specialists.same_compute=false")
    assert main(["specialists", *_args(copy_of, *fast, "specialists.reinit_blocks=1")]) == 0
    generalist, _ = load_generalist(copy_of / "run")
    generalist.requires_grad_(False)
    for group_dir in sorted((copy_of / "run" / "specialists").glob("group_*")):
        spec, meta = load_specialist(group_dir)
        spec.requires_grad_(False)
        assert meta["specialist"]["reinit_blocks"] == 1 and meta["specialist"]["train_out_rows"] is True
        moved = [float((a - b).abs().max()) for a, b in zip(
            spec.trunk.blocks[-1].parameters(), generalist.blocks[-1].parameters(), strict=True)]
        kept = [float((a - b).abs().max()) for a, b in zip(
            spec.trunk.blocks[0].parameters(), generalist.blocks[0].parameters(), strict=True)]
        assert max(moved) > 10 * max(kept)  # a fresh block, not a 4-step fine-tune of the generalist's
        assert not torch.equal(spec.out_weight, generalist.head.weight[list(spec.out_classes)])
        # the generalist's own group top-1 is still what the stage compares with (measured before the
        # fresh start): the same as the untrained specialist of the run without reinit_blocks
        plain = json.loads((trained["root"] / "run" / "specialists" / group_dir.name / "model.json").read_text())
        assert meta["metrics"]["generalist_group_top1"] == plain["metrics"]["init_group_top1"]
    capsys.readouterr()
    assert main(["specialists", *_args(copy_of, "specialists.reinit_blocks=1", "specialists.finetune=head")]) == 2
    err = capsys.readouterr().err
    assert "reinit_blocks=1 would leave freshly initialised blocks frozen" in err and "finetune=all" in err


def test_corrupt_snapshot_is_reported_and_the_specialist_restarts(upstream, tmp_path):
    config = load_config(None, _args(upstream, "specialists.epochs=1", "specialists.num_batches=2"))
    data = create_dataset("hierarchy", seed=0, **config.data.options)
    group_dir = tmp_path / "group_000"
    (group_dir / "checkpoints" / "epoch_0001").mkdir(parents=True)
    (group_dir / "checkpoints" / "latest.json").write_text('{"epoch": 1, "dir": "epoch_0001"}')
    (group_dir / "checkpoints" / "epoch_0001" / "state.pt").write_bytes(b"not a checkpoint")
    job = SpecialistJob(group_id=0, classes=(0, 1, 2), names=tuple(data.class_names[:3]),
                        group_dir=str(group_dir), run_dir=str(upstream / "run"),
                        seed=0, settings=config.specialists)
    summary = train_specialist(job, {"train_images": data.train.images, "train_labels": data.train.labels,
                                     "holdout_images": data.holdout.images,
                                     "holdout_labels": data.holdout.labels})
    progress = json.loads((group_dir / "progress.json").read_text())
    assert "cannot resume" in progress["warnings"][0] and "training from scratch" in progress["warnings"][0]
    assert summary["metrics"]["epochs_trained"] == 1 and summary["resumed_from_epochs"] == []
    assert (group_dir / "model.safetensors").exists() and not (group_dir / "checkpoints").exists()
