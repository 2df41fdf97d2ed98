"""Shared test fixtures: one torch thread, a tiny hierarchy config, an isolated sqlite MLflow
store, a real mlflow server, and a tiny run finished up to the ensemble stage."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def single_torch_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP barrier stalls on shared 2-core machines."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


TINY_DATA = (
    "data.name=hierarchy",
    "data.options={num_superclasses: 3, classes_per_superclass: 3, train_per_class: 24, "
    "holdout_per_class: 8, test_per_class: 8, image_size: 16}",
)
TINY_GENERALIST = (
    "generalist.model=cnn",
    "generalist.width=0.25",
    "generalist.epochs=2",
    "generalist.batch_size=32",
    "generalist.optimizer.name=sgd",
    "generalist.optimizer.lr=0.05",
)
# Whole-pipeline tests run the distill stage too: one short epoch, no data-free row, no registry
# (tests/orchestration/test_distill_stage.py covers those).
TINY_DISTILL = (
    "distill.epochs=1", "distill.batch_size=32", "distill.eval_batch_size=64", "distill.width=0.125",
    "distill.data_free.enabled=false", "distill.register_model=false",
)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in tmp_path (MLflow's default ./mlruns artifacts land here, not in the repo)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture
def tiny_args(workdir):
    def make(*extra: str, run_dir: str = "run", uri: str | None = None) -> list[str]:
        uri = uri or f"sqlite:///{workdir / 'mlflow.db'}"
        return [
            f"run.dir={workdir / run_dir}", "run.device=cpu", "run.num_threads=1",
            f"tracking.uri={uri}", *TINY_DATA, *TINY_GENERALIST, *TINY_DISTILL, *extra,
        ]

    return make


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """A function returning a TCP port that is free on 127.0.0.1 right now."""
    return _free_port


def _start_mlflow_server(root: Path, port: int, new_session: bool = False) -> subprocess.Popen:
    """Start ``mlflow server`` on 127.0.0.1:port with its store under ``root``; wait for /health.

    ``new_session`` puts it in its own process group (so a test can kill -9 the group and later
    start a server again on the same store and port)."""
    mlflow_bin = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    proc = subprocess.Popen(
        [mlflow_bin, "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "ab"), start_new_session=new_session,
        env={**os.environ, "MLFLOW_TRACKING_URI": ""},
    )
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError((root / "server.log").read_text()[-2000:]) from None
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("mlflow server did not start in 90 s")


@pytest.fixture(scope="session")
def mlflow_server_factory():
    """``start(root, port, new_session=False) -> Popen``: a real ``mlflow server`` the test owns."""
    return _start_mlflow_server


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1, stopped at the end of the session."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    proc = _start_mlflow_server(root, port)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


TINY_SPECIALISTS = ("specialists.epochs=1", "specialists.batch_size=32", "specialists.finetune=head",
                    "ensemble.batch_size=16")


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A tiny run finished up to the ensemble stage, built once per session; treat it as read-only.

    Returns ``{"path": run dir, "uri": its sqlite MLflow store, "root": the folder holding both}``.
    """
    from orchestration.cli import main

    root = tmp_path_factory.mktemp("finished-run")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    args = [f"run.dir={root / 'run'}", "run.device=cpu", "run.num_threads=1", f"tracking.uri={uri}",
            *TINY_DATA, *TINY_GENERALIST, *TINY_SPECIALISTS, *TINY_DISTILL]
    cwd, saved = os.getcwd(), os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.chdir(root)
    try:
        assert main(["run", *args, "--to", "ensemble"]) == 0
    finally:
        os.chdir(cwd)
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    return {"path": root / "run", "uri": uri, "root": root, "args": args}


@pytest.fixture(scope="session")
def pipeline_args():
    """``make(run_dir, uri, *extra)``: CLI overrides for the whole tiny pipeline (every stage)."""

    def make(run_dir: Path, uri: str, *extra: str) -> list[str]:
        return [f"run.dir={run_dir}", "run.device=cpu", "run.num_threads=1", f"tracking.uri={uri}",
                *TINY_DATA, *TINY_GENERALIST, *TINY_SPECIALISTS, *TINY_DISTILL, *extra]

    return make
