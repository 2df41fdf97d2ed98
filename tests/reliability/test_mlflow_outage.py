"""The MLflow server goes away mid-run: training continues, the tracking calls are buffered in
the run directory, nothing is lost, and they reach the server once it is back (next run).
Unreachable at the start: a clear error before any training."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestration.artifacts import TRACKING_BUFFER as BUFFER
from orchestration.cli import main

SPECDISTILL = str(Path(sys.executable).parent / "specdistill")
STAGES = ("generalist", "clustering", "specialists", "ensemble", "distill")


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def test_unreachable_at_start_fails_before_any_training(tiny_args, workdir, capsys, free_port):
    uri = f"http://127.0.0.1:{free_port()}"
    assert main(["run", *tiny_args(uri=uri)]) == 1
    err = capsys.readouterr().err
    assert "is unreachable" in err and "mlflow server" in err
    assert not (workdir / "run" / "generalist").exists()


def test_server_lost_mid_run_then_back(pipeline_args, tmp_path, mlflow_server_factory):
    server = mlflow_server_factory(tmp_path, new_session=True)
    port, uri = server.port, server.url
    run = tmp_path / "run"
    args = ["run", *pipeline_args(run, uri, "generalist.epochs=3")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([SPECDISTILL, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (run / "generalist" / "checkpoints" / "latest.json").exists() and time.time() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        _stop(server.proc)  # the server dies during the generalist's training
        out, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert "failed" in err and f"buffered in {run / BUFFER}" in err
    for stage in STAGES:  # nothing in the run directory was lost
        assert (run / stage / "manifest.json").exists(), stage
    assert (run / BUFFER).stat().st_size > 0

    server = mlflow_server_factory(tmp_path, port, new_session=True)  # back, with the same store
    try:
        done = subprocess.run([SPECDISTILL, *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "buffered MLflow calls" in done.stderr
        assert not (run / BUFFER).exists()
        client = MlflowClient(tracking_uri=uri)
        runs = client.search_runs([client.get_experiment_by_name("specdistill").experiment_id])
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        assert len(parents) == 1
        stage_runs = [r for r in runs if r.data.tags.get("specdistill.stage") in STAGES
                      and "specdistill.group_id" not in r.data.tags]
        assert sorted(r.data.tags["specdistill.stage"] for r in stage_runs) == sorted(STAGES)
        assert {r.info.status for r in runs} == {"FINISHED"}
        distill = next(r for r in stage_runs if r.data.tags["specdistill.stage"] == "distill")
        assert distill.data.metrics, "the distill stage's metrics (logged while the server was away) are missing"
    finally:
        _stop(server.proc)


@pytest.fixture(autouse=True)
def _no_inherited_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
