"""Fixtures shared by the data-parallel training tests: a local Ray, and watching a running
`specdistill` for its epoch snapshots and its Ray Train worker processes."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import ray

from orchestration.local_ray import descendants


@pytest.fixture(scope="module")
def local_ray():
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def _wait_for_epoch(proc: subprocess.Popen, latest: Path, epoch: int) -> None:
    """Return once ``latest`` (a checkpoints/latest.json) names ``epoch`` or later; fail after 240 s."""
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        if latest.exists() and json.loads(latest.read_text() or "{}").get("epoch", 0) >= epoch:
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no epoch {epoch} snapshot: {proc.stdout.read()[-3000:]}")


def _train_workers(pid: int) -> list[int]:
    """The Ray Train worker processes below ``pid``."""
    found = []
    for child in descendants(pid):
        try:
            if b"RayTrainWorker" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
        except OSError:
            continue
    return sorted(found)


@pytest.fixture
def wait_for_epoch() -> Callable[[subprocess.Popen, Path, int], None]:
    return _wait_for_epoch


@pytest.fixture
def train_workers() -> Callable[[int], list[int]]:
    return _train_workers
