"""The cluster path: `ray start --head` (token auth on), then `ray job submit ... -- specdistill
run CONFIG`, exactly as docs/cluster.md tells users to do it. The stage runs unchanged inside
the job (it attaches to the job's cluster) and every specialist lands in the run directory.

The head is started with `--block` in its own process group and stopped by terminating that
process, which stops only this cluster (`ray stop` would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PACKAGES = ("generalist", "specialists", "clustering", "distill", "orchestration")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in socks]
    for sock in socks:
        sock.close()
    return ports


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:  # answering (e.g. 401 without a token): it is up
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited:\n{log.read_text()[-3000:]}") from None
            time.sleep(0.5)
    raise RuntimeError(f"Ray dashboard {url} did not come up in {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A one-node Ray cluster on 127.0.0.1 with token authentication, stopped afterwards."""
    gcs, dashboard, client, agent, agent_grpc, runtime_env, metrics = _free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths are limited
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex,
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path_factory.mktemp("ray-head") / "head.log"
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
         f"--metrics-export-port={metrics}", "--num-cpus=2", f"--temp-dir={temp_dir}"],
        env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        _wait_http(f"http://127.0.0.1:{dashboard}/api/version", proc, log)
        yield {"address": f"http://127.0.0.1:{dashboard}", "env": env, "log": log}
    finally:
        proc.terminate()  # `ray start --block` drains and stops the processes it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _working_dir(root: Path, run_dir: Path, db: Path) -> Path:
    """What `--working-dir .` uploads from a checkout: the packages and a config."""
    wd = root / "wd"
    for package in PACKAGES:
        shutil.copytree(REPO / package, wd / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", wd / "pyproject.toml")
    config = {
        "run": {"dir": str(run_dir), "device": "cpu", "num_threads": 1},
        "tracking": {"uri": f"sqlite:///{db}"},
        "data": {"name": "hierarchy", "options": {
            "num_superclasses": 3, "classes_per_superclass": 3, "train_per_class": 24,
            "holdout_per_class": 8, "test_per_class": 8, "image_size": 16}},
        "generalist": {"model": "cnn", "width": 0.25, "epochs": 2, "batch_size": 32,
                       "optimizer": {"name": "sgd", "lr": 0.05}},
        "specialists": {"epochs": 2, "batch_size": 32},
        "distill": {"epochs": 1, "batch_size": 32, "width": 0.125, "data_free": {"enabled": False},
                    "register_model": False},
    }
    (wd / "tiny.yaml").write_text(yaml.safe_dump(config))
    return wd


def test_pipeline_submitted_to_a_token_auth_cluster_runs_every_stage(ray_head, tmp_path):
    run_dir, db = tmp_path / "run", tmp_path / "mlflow.db"
    wd = _working_dir(tmp_path, run_dir, db)
    job = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", ray_head["address"],
         "--working-dir", str(wd), "--", "specdistill", "run", "tiny.yaml"],
        env=ray_head["env"], capture_output=True, text=True, timeout=400,
    )
    output = job.stdout + job.stderr
    assert job.returncode == 0 and "succeeded" in output, output[-4000:]
    assert "on Ray cluster at" in output and "done specialists" in output
    for stage in ("ensemble", "distill"):  # the whole pipeline ran as one job
        assert (run_dir / stage / "manifest.json").exists(), output[-4000:]
    assert (run_dir / "report.md").exists() and "specdistill results" in output

    groups = json.loads((run_dir / "clustering" / "groups.json").read_text())["groups"]
    manifest = json.loads((run_dir / "specialists" / "manifest.json").read_text())
    for group in groups:
        assert f"group_{group['id']:03d}/model.safetensors" in manifest["outputs"]
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("specdistill").experiment_id])
    specialist_runs = [r for r in runs if "specdistill.group_id" in r.data.tags]
    assert len(specialist_runs) == len(groups)
    assert all(r.info.status == "FINISHED" for r in specialist_runs)


def _submit(ray_head, wd: Path, *args: str) -> str:
    job = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", ray_head["address"],
         "--working-dir", str(wd), "--", "specdistill", "run", "tiny.yaml", *args],
        env=ray_head["env"], capture_output=True, text=True, timeout=400,
    )
    output = job.stdout + job.stderr
    assert job.returncode == 0 and "succeeded" in output, output[-4000:]
    return output


def test_a_submitted_job_waits_for_approval_and_the_next_submission_continues(ray_head, tmp_path):
    run_dir, db = tmp_path / "run", tmp_path / "mlflow.db"
    wd = _working_dir(tmp_path, run_dir, db)
    output = _submit(ray_head, wd, "clustering.require_approval=true", "--to", "specialists")
    assert "stopped after clustering: waiting for approval" in output and "--approve" in output
    assert not (run_dir / "specialists" / "manifest.json").exists()

    approve = subprocess.run([str(BIN / "specdistill"), "groups", str(run_dir), "--approve"],
                             env=ray_head["env"], capture_output=True, text=True, timeout=120)
    assert approve.returncode == 0, approve.stdout + approve.stderr
    output = _submit(ray_head, wd, "clustering.require_approval=true", "--to", "specialists")
    assert "skip clustering" in output and "done specialists" in output, output[-4000:]
    assert (run_dir / "specialists" / "manifest.json").exists()


def test_job_submit_without_the_token_is_refused(ray_head):
    env = {k: v for k, v in ray_head["env"].items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env["HOME"] = tempfile.mkdtemp(prefix="home")  # no ~/.ray/auth_token to fall back on
    job = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", ray_head["address"], "--", "true"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert job.returncode != 0
    assert "Authentication" in job.stdout + job.stderr


def test_example_cluster_yaml_is_valid_for_ray_up():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "configs" / "cluster" / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(config))
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert "~/.ray/auth_token" in config["file_mounts"]
