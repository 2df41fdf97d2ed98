"""Data-parallel training survives a killed Ray Train worker and a killed, resubmitted job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

SPECDISTILL = str(Path(sys.executable).parent / "specdistill")
PARALLEL = ("ray.train.workers=2", "ray.local_num_cpus=2", "generalist.epochs=12", "generalist.patience=12")


def _start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([SPECDISTILL, "generalist", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)




def _stage_runs(uri: str) -> list:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("specdistill")
    return client.search_runs([exp.experiment_id], filter_string="tags.`specdistill.stage` = 'generalist'")


def test_a_killed_worker_restarts_the_group_from_the_last_epoch(tiny_args, workdir, wait_for_epoch, train_workers):
    args = tiny_args(*PARALLEL)
    stage = workdir / "run" / "generalist"
    proc = _start(args)
    wait_for_epoch(proc, stage / "checkpoints" / "latest.json", 2)
    workers = train_workers(proc.pid)
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "resuming after epoch" in out and "epoch 12/12" in out
    assert (stage / "manifest.json").exists() and (stage / "model.safetensors").exists()
    runs = _stage_runs(f"sqlite:///{workdir / 'mlflow.db'}")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


@pytest.mark.slow
def test_a_killed_job_resubmitted_resumes(tiny_args, workdir, wait_for_epoch):
    args = tiny_args(*PARALLEL)
    stage = workdir / "run" / "generalist"
    proc = _start(args)
    wait_for_epoch(proc, stage / "checkpoints" / "latest.json", 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (stage / "manifest.json").exists()

    again = _start(args)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out[-3000:]
    assert "resuming after epoch" in out and "epoch 12/12" in out and "epoch 1/12 " not in out
    assert (stage / "manifest.json").exists()
    assert len(_stage_runs(f"sqlite:///{workdir / 'mlflow.db'}")) == 1
