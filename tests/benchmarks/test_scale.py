"""benchmarks.scale's measuring parts: the process-tree memory probe and the 10x ratio."""

import sys

import pytest

from benchmarks.scale_probe import ratio_10x, run_measured

ALLOCATE = "import sys, numpy as np; a = np.ones({n} * 2**20 // 8); a[::512] += 1"


def _tree(child_mib: int) -> list[str]:
    """A parent of ~0 MiB whose child touches ``child_mib`` MiB."""
    child = ALLOCATE.format(n=child_mib)
    return [sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}], check=True)"]


def test_the_probe_sees_a_child_processes_peak():
    small, large = run_measured(_tree(20)), run_measured(_tree(300))
    role = "python -c"
    assert large[role] - small[role] > 250 * 2**20          # the child's 280 extra MiB are seen
    ratio, worst = ratio_10x(small, large)
    assert worst == role and ratio > 1.5


def test_ratio_is_the_worst_role_present_in_both_runs():
    ratio, role = ratio_10x({"driver": 100, "raylet": 50, "gone": 1}, {"driver": 110, "raylet": 70, "new": 999})
    assert role == "raylet" and ratio == pytest.approx(1.4)
    with pytest.raises(ValueError, match="share no process role"):
        ratio_10x({"a": 1}, {"b": 1})


def test_a_failing_command_raises_with_its_output(tmp_path):
    with pytest.raises(RuntimeError, match="exited with 3"):
        run_measured([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], log=tmp_path / "log")
