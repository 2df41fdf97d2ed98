"""Shared test fixtures: one torch thread, a tiny hierarchy config, an isolated sqlite MLflow
store, a real mlflow server, and a tiny run finished up to the ensemble stage."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
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
# A 2-epoch tiny generalist confuses classes at random: the tiny runs group its covariance columns
# (the machinery under test); the confusion affinity is tested on data with real structure.
TINY_CLUSTERING = ("clustering.affinity=covariance",)
# Tests train in float32, so that a tiny run's groups and figures are the same on every CPU (bf16
# mixed precision takes another path on a CPU with native bf16): tests/orchestration/test_pipeline.py
# runs the stages' bf16 path.
TINY_RUN = ("run.cpu_bf16=false",)
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
            f"run.dir={workdir / run_dir}", "run.device=cpu", "run.num_threads=1", *TINY_RUN,
            f"tracking.uri={uri}", *TINY_DATA, *TINY_GENERALIST, *TINY_CLUSTERING, *TINY_DISTILL, *extra,
        ]

    return make


def _ephemeral_low() -> int:
    """The lowest port of the kernel's ephemeral range (the ports bind(0) and connect() hand out)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 49152  # the IANA range, used by macOS and Windows


# Ray's worker ports are 10002-19999 by default: pick between those and the ephemeral range.
PORT_BAND = (20000, max(_ephemeral_low(), 20100))
_handed_out: set[int] = set()
_random = random.SystemRandom()


def _free_port() -> int:
    """A TCP port free on 127.0.0.1 now, never handed out before in this session.

    It comes from below the ephemeral range, which the kernel never hands out by itself: between
    this check and the server binding it, the only ones that can take it are processes choosing
    this very number (an outgoing connection or a bind(0) elsewhere cannot)."""
    while True:
        port = _random.randrange(*PORT_BAND)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port


@pytest.fixture(scope="session")
def free_port():
    """A function returning a TCP port that is free on 127.0.0.1 right now (see ``_free_port``)."""
    return _free_port


@dataclass
class MlflowServer:
    """A running ``mlflow server`` on 127.0.0.1:port."""

    proc: subprocess.Popen
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


SERVER_START_ATTEMPTS = 5
SERVER_START_TIMEOUT_S = 300  # a hang guard: it is up in 10-40 s on a busy 2-core machine


def _start_mlflow_server(root: Path, port: int | None = None, new_session: bool = False) -> MlflowServer:
    """Start ``mlflow server`` with its store under ``root``; return once /health answers.

    With no ``port`` it takes a free one, and another one when that was taken before the server
    bound it. A given ``port`` (a restart on the same store and address) is used as it is.
    ``new_session`` puts it in its own process group (so a test can kill -9 the group and later
    start a server again on the same store and port)."""
    for _ in range(SERVER_START_ATTEMPTS if port is None else 1):
        chosen = port or _free_port()
        proc = _launch_mlflow_server(root, chosen, new_session)
        if proc is not None:
            return MlflowServer(proc, chosen)
    raise RuntimeError(f"mlflow server found its port taken {SERVER_START_ATTEMPTS} times in a row "
                       f"(or port {port} is in use); see {root / 'server.log'}")


def _launch_mlflow_server(root: Path, port: int, new_session: bool) -> subprocess.Popen | None:
    """The started server, or None when the port was in use (the server logs it and exits)."""
    log = root / "server.log"
    offset = log.stat().st_size if log.exists() else 0  # restarts append to the same log
    mlflow_bin = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [mlflow_bin, "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
             "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=out, start_new_session=new_session,
            env={**os.environ, "MLFLOW_TRACKING_URI": ""},
        )
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None:
                with open(log, "rb") as f:
                    f.seek(offset)
                    text = f.read().decode(errors="replace")
                if "address already in use" in text.lower():
                    return None
                raise RuntimeError(text[-2000:]) from None
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"mlflow server did not answer in {SERVER_START_TIMEOUT_S} s; see {log}")


@pytest.fixture(scope="session")
def mlflow_server_factory():
    """``start(root, port=None, new_session=False) -> MlflowServer``: a real ``mlflow server``
    the test owns (``.proc``, ``.port``, ``.url``)."""
    return _start_mlflow_server


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1, stopped at the end of the session."""
    root = tmp_path_factory.mktemp("mlflow-server")
    server = _start_mlflow_server(root)
    yield server.url
    server.proc.terminate()
    try:
        server.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.proc.kill()


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
    args = [f"run.dir={root / 'run'}", "run.device=cpu", "run.num_threads=1", *TINY_RUN, f"tracking.uri={uri}",
            *TINY_DATA, *TINY_GENERALIST, *TINY_CLUSTERING, *TINY_SPECIALISTS, *TINY_DISTILL]
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
        return [f"run.dir={run_dir}", "run.device=cpu", "run.num_threads=1", *TINY_RUN, f"tracking.uri={uri}",
                *TINY_DATA, *TINY_GENERALIST, *TINY_CLUSTERING, *TINY_SPECIALISTS, *TINY_DISTILL, *extra]

    return make
