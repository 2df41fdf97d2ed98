"""A generalist killed with SIGKILL mid-training resumes from its last epoch checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SPECDISTILL = str(Path(sys.executable).parent / "specdistill")


def test_sigkill_mid_training_then_resume(tiny_args, workdir):
    args = tiny_args("generalist.epochs=12", "generalist.patience=12")
    state = workdir / "run" / "generalist" / "checkpoints" / "latest.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([SPECDISTILL, "generalist", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert state.exists(), proc.stdout.read().decode()[-3000:]
    assert not (workdir / "run" / "generalist" / "manifest.json").exists()

    done = subprocess.run([SPECDISTILL, "generalist", *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resuming after epoch" in done.stdout
    assert "epoch 12/12" in done.stdout and "epoch 1/12 " not in done.stdout
    assert (workdir / "run" / "generalist" / "manifest.json").exists()
