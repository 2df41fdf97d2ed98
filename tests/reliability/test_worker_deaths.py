"""A specialist's Ray worker is SIGKILLed twice (after its first and after its second epoch);
Ray retries the task, it resumes from its latest epoch checkpoint each time, and the stage
still completes with every specialist trained for all its epochs."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from orchestration.cli import main

SPECIALISTS = ("specialists.epochs=4", "specialists.patience=4", "specialists.batch_size=32",
               "specialists.num_batches=60", "specialists.max_retries=3", "ensemble.cache.enabled=false")


class _TwiceKiller(threading.Thread):
    """Kills the worker training ``group_dir`` once its epoch checkpoint shows 1, then 2 epochs."""

    def __init__(self, group_dir: Path):
        super().__init__(daemon=True)
        self.group_dir, self.killed = group_dir, []

    def _epochs(self) -> int:
        try:
            return len(json.loads((self.group_dir / "progress.json").read_text())["epochs"])
        except (OSError, ValueError, KeyError):
            return 0

    def run(self) -> None:
        deadline = time.time() + 300
        for target in (1, 2):
            while self._epochs() < target and time.time() < deadline:
                time.sleep(0.01)
            if (self.group_dir / "model.json").exists():
                return
            pid = int((self.group_dir / "worker.pid").read_text())
            if pid in self.killed:  # the retry has not started yet: wait for its own pid
                continue
            os.kill(pid, signal.SIGKILL)
            self.killed.append(pid)


@pytest.mark.slow
def test_a_worker_that_dies_twice_still_finishes(tiny_args, workdir):
    killer = _TwiceKiller(workdir / "run" / "specialists" / "group_000")
    assert main(["run", *tiny_args(), "--to", "clustering"]) == 0
    killer.start()
    assert main(["run", *tiny_args(*SPECIALISTS), "--to", "specialists"]) == 0
    killer.join(timeout=5)
    assert len(killer.killed) == 2, killer.killed
    stage = workdir / "run" / "specialists"
    meta = json.loads((stage / "group_000" / "model.json").read_text())
    assert meta["metrics"]["epochs_trained"] == 4 and len(meta["history"]) == 4
    assert len(meta["resumed_from_epochs"]) >= 2
    assert int((stage / "group_000" / "worker.pid").read_text()) not in killer.killed
    groups = json.loads((workdir / "run" / "clustering" / "groups.json").read_text())["groups"]
    for group in groups:
        assert (stage / f"group_{group['id']:03d}" / "model.safetensors").exists()
