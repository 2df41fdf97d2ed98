"""kill -9 of the pipeline process at stage boundaries and mid-stage, then resume.

Each case starts ``specdistill run`` on the tiny pipeline, SIGKILLs the process (and the
private Ray it started) as soon as a trigger file appears, runs the same command again, and
compares the result with an uninterrupted run: the same groups, the same metrics within
tolerance, every stage finished, and in MLflow exactly one parent run, one child run per
stage and one per specialist (none lost, none duplicated), all FINISHED.

CI runs the mid-specialists case (the parallel Ray stage); ``-m slow`` runs every kill point.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

SPECDISTILL = str(Path(sys.executable).parent / "specdistill")
STAGES = ("generalist", "clustering", "specialists", "ensemble", "distill")
EXTRA = ("specialists.epochs=2", "specialists.patience=5", "generalist.epochs=3", "generalist.patience=5")
ACCURACY_TOLERANCE = 0.03  # 72 test examples: about two examples


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return env


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([SPECDISTILL, "run", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def reference(tmp_path_factory, pipeline_args):
    root = tmp_path_factory.mktemp("reference")
    _run(pipeline_args(root / "run", f"sqlite:///{root / 'mlflow.db'}", *EXTRA), root)
    return root


def _kill_when(args: list[str], cwd: Path, trigger: str, run_dir: Path) -> None:
    """Start the pipeline in its own process group; SIGKILL it when ``trigger`` (a glob under the
    run dir) matches, then SIGKILL what is left of its group (its private Ray)."""
    proc = subprocess.Popen([SPECDISTILL, "run", *args], cwd=cwd, env=_env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while not list(run_dir.glob(trigger)) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"finished before {trigger} appeared:\n{proc.stdout.read().decode()[-3000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(0.5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _summary(root: Path) -> dict:
    run = root / "run"
    manifests = {s: json.loads((run / s / "manifest.json").read_text()) for s in STAGES}
    groups = json.loads((run / "clustering" / "groups.json").read_text())["groups"]
    rows = {r["name"]: r for r in json.loads((run / "distill" / "results.json").read_text())["rows"]}
    return {"groups": [g["classes"] for g in groups], "manifests": manifests, "rows": rows}


def _check_mlflow(root: Path, n_groups: int) -> None:
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("specdistill").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    parent = parents[0].info.run_id
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert len(children) == len(runs) - 1
    stages = [r.data.tags["specdistill.stage"] for r in children if "specdistill.group_id" not in r.data.tags]
    assert sorted(stages) == sorted(STAGES)  # one child per stage: none lost, none duplicated
    specialists = [r.data.tags["specdistill.group_id"] for r in children if "specdistill.group_id" in r.data.tags]
    assert sorted(specialists, key=int) == [str(i) for i in range(n_groups)]
    assert {r.info.status for r in runs} == {"FINISHED"}


KILL_POINTS = [
    pytest.param("generalist/checkpoints/latest.json", id="mid-generalist", marks=pytest.mark.slow),
    pytest.param("generalist/manifest.json", id="after-generalist", marks=pytest.mark.slow),
    pytest.param("clustering/manifest.json", id="after-clustering", marks=pytest.mark.slow),
    pytest.param("specialists/group_000/checkpoints/latest.json", id="mid-specialists"),
    pytest.param("specialists/manifest.json", id="after-specialists", marks=pytest.mark.slow),
    pytest.param("ensemble/evaluation.json", id="mid-ensemble", marks=pytest.mark.slow),
    pytest.param("ensemble/manifest.json", id="after-ensemble", marks=pytest.mark.slow),
    pytest.param("distill/**/row.json", id="mid-distill", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("trigger", KILL_POINTS)
def test_kill_then_resume_matches_an_uninterrupted_run(trigger, reference, tmp_path, pipeline_args):
    args = pipeline_args(tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}", *EXTRA)
    _kill_when(args, tmp_path, trigger, tmp_path / "run")
    killed_stage = trigger.split("/")[0]
    assert not (tmp_path / "run" / "distill" / "manifest.json").exists()

    done = _run(args, tmp_path)
    for stage in STAGES[:STAGES.index(killed_stage) + (1 if trigger.endswith("manifest.json") else 0)]:
        assert f"skip {stage}" in done.stdout  # finished stages are not redone
    got, want = _summary(tmp_path), _summary(reference)
    assert got["groups"] == want["groups"]
    for stage, key in [("generalist", "test_top1"), ("ensemble", "generalist_top1"), ("ensemble", "ensemble_top1")]:
        assert abs(got["manifests"][stage]["metrics"][key] - want["manifests"][stage]["metrics"][key]) <= ACCURACY_TOLERANCE
    assert got["rows"].keys() == want["rows"].keys()
    for name, row in want["rows"].items():
        assert abs(got["rows"][name]["top1"] - row["top1"]) <= ACCURACY_TOLERANCE, name
    _check_mlflow(tmp_path, len(want["groups"]))
