"""The distill stage's students on Ray Train: each rank's part of every global batch with its
example ids, terms that cannot be data-parallel, two gloo workers through the CLI, and a killed
worker."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mlflow.tracking import MlflowClient

from distill.objective import TermKind
from distill.train import iterate_indexed_batches
from orchestration.cli import main
from orchestration.ray_train import RayTrainError
from orchestration.student_train import Row, check_data_parallel

SPECDISTILL = str(Path(sys.executable).parent / "specdistill")
# The student's hint term has a learnable regressor: the objective is a DDP module too.
STUDENT = ("distill.epochs=2", "distill.baselines=true", "distill.student=cnn",
           "distill.losses={hint: 1.0}", "distill.hint_layers=[blocks.1, blocks.1]")
ROWS = ("student", "hard_labels", "generalist_kd")



def _batches(shuffle: bool = False, **kw) -> list:
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1) * 10   # pixel = 10 x position
    labels = torch.arange(10) % 3
    return list(iterate_indexed_batches(images, labels, batch_size=4, shuffle=shuffle, **kw))


def test_each_rank_gets_its_slice_of_every_complete_global_batch_with_ids():
    one = _batches()
    assert [b.ids.tolist() for b in one] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    ranks = [_batches(rank=r, world_size=2) for r in (0, 1)]
    assert [b.ids.tolist() for b in ranks[0]] == [[0, 1], [4, 5]]      # last (incomplete) batch dropped
    assert [b.ids.tolist() for b in ranks[1]] == [[2, 3], [6, 7]]
    second = ranks[1][1]
    assert second.x.flatten().tolist() == pytest.approx([60 / 255, 70 / 255])
    assert second.y.tolist() == [0, 1]                                  # labels of positions 6, 7
    shuffled = [_batches(shuffle=True, seed=3, epoch=1, rank=r, world_size=2) for r in (0, 1)]
    whole = _batches(shuffle=True, seed=3, epoch=1)                     # the order of one worker
    for step in range(2):
        assert torch.equal(torch.cat([shuffled[0][step].ids, shuffled[1][step].ids]), whole[step].ids)


def test_a_memory_bank_by_example_id_cannot_train_data_parallel():
    by_id = TermKind("features", False, True, ("pool", "pool"), False)
    hint = TermKind("features", False, False, None, False)
    row = Row("student", "ensemble (cache)", 0.9, None, True, "")
    check_data_parallel(row, SimpleNamespace(kinds={"hint": hint}))
    with pytest.raises(RayTrainError, match=r"\['crd'\].*ray.train.workers=1"):
        check_data_parallel(row, SimpleNamespace(kinds={"hint": hint, "crd": by_id}))


def test_students_train_on_two_workers_with_identical_weights_like_one(local_ray, finished_run, workdir, capsys):
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    parallel, single = workdir / "run", workdir / "single"
    for run_dir in (parallel, single):                 # the session's run, finished up to the ensemble
        shutil.copytree(finished_run["path"], run_dir)

    def distill(run_dir: Path, *extra: str) -> list[str]:
        return ["run", *finished_run["args"], f"run.dir={run_dir}", f"tracking.uri={uri}", *STUDENT, *extra,
                "--only", "distill"]

    assert main(distill(parallel, "ray.train.workers=2")) == 0
    out = capsys.readouterr().out
    for row in ROWS:
        assert f"{row}: data-parallel on Ray Train, 2 workers x 1 CPUs" in out
    assert main(distill(single)) == 0
    assert "data-parallel" not in capsys.readouterr().out

    rows = {d: {r["name"]: r for r in json.loads((d / "distill" / "results.json").read_text())["rows"]}
            for d in (parallel, single)}
    assert list(rows[parallel]) == list(rows[single])
    for row in ROWS:
        # Same teachers, initial weights, global batch and schedule; two workers drop the last
        # incomplete batch (216 = 6 x 32 + 24) and normalise BatchNorm over 16 examples. On 72
        # test images (one is 0.014) after 2 short epochs from a 2-epoch generalist, top-1 is
        # near chance and moves by a few images: a loose bound (measured: <= 0.014 apart).
        assert abs(rows[parallel][row]["top1"] - rows[single][row]["top1"]) <= 0.15, row
        assert (parallel / "distill" / rows[parallel][row]["path"]).exists()

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("specdistill")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`specdistill.stage` = 'distill'")
    assert len(runs) == 2                                       # one per run directory, all rows inside
    on_two = [r for r in runs if "specdistill.ray_train.student.weights_sha256" in r.data.tags]
    assert len(on_two) == 1
    run, other = on_two[0], next(r for r in runs if r.info.run_id != on_two[0].info.run_id)
    for row in ROWS:
        digests = run.data.tags[f"specdistill.ray_train.{row}.weights_sha256"].split(",")
        assert len(digests) == 2 and digests[0] == digests[1]
    for row in ROWS:                                            # measured: <= 0.008 apart
        history = {r.info.run_id: client.get_metric_history(r.info.run_id, f"{row}/train_loss") for r in (run, other)}
        assert sorted(m.step for m in history[run.info.run_id]) == [1, 2]
        first = [next(m.value for m in history[r.info.run_id] if m.step == 1) for r in (run, other)]
        assert abs(first[0] - first[1]) < 0.05, row             # same model, data and learning rate




@pytest.mark.slow  # the same restart path as the generalist's killed-worker test, which CI runs
def test_a_killed_worker_restarts_the_row_from_its_last_checkpoint(finished_run, workdir, wait_for_epoch,
                                                                  train_workers):
    shutil.copytree(finished_run["path"], workdir / "run")
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    args = ["run", *finished_run["args"], f"run.dir={workdir / 'run'}", f"tracking.uri={uri}",
            "distill.epochs=8", "distill.baselines=false", "ray.train.workers=2", "ray.local_num_cpus=2",
            "--only", "distill"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([SPECDISTILL, *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for_epoch(proc, workdir / "run" / "distill" / "checkpoints" / "latest.json", 2)
    workers = train_workers(proc.pid)
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "student: resuming after epoch" in out and "student epoch 8/8" in out
    assert (workdir / "run" / "distill" / "student.safetensors").exists()
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("specdistill")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`specdistill.stage` = 'distill'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "student/train_loss")]
    assert sorted(set(steps)) == list(range(1, 9))
