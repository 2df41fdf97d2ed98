"""Peak resident memory of every process of a command, for ``benchmarks.scale``.

    peaks = run_measured(["specdistill", "run", ...], env=env)   # {role: peak bytes}

The command runs as a child; a thread polls ``/proc`` (every 50 ms) for the child and all its
descendants (Ray's raylet, workers, data-loader workers) and keeps each process's ``VmHWM``
(the kernel's own high-water mark of resident memory, so short peaks between polls still count).
Processes are grouped by role (the program and, for Python, the module or script it runs;
Ray workers by the actor or task they last ran), and a role's peak is the largest of its
processes' peaks.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from orchestration.local_ray import descendants

PROC = Path("/proc")


def peak_rss(pid: int) -> int | None:
    """The process's high-water mark of resident memory in bytes (None once it is gone)."""
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def role(pid: int) -> str | None:
    """A stable name for what the process is: e.g. ``specdistill``, ``raylet``, ``ray::IDLE``."""
    try:
        argv = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    words = [w.decode(errors="replace") for w in argv if w]
    if not words:
        return None
    if words[0].startswith("ray::"):
        return words[0].split()[0]
    program = Path(words[0]).name
    if program.startswith("python") and len(words) > 1:
        rest = words[2] if words[1] == "-m" and len(words) > 2 else Path(words[1]).name
        return f"python {rest}"
    return program


class TreePeaks:
    """Polls a process tree and keeps each process's peak RSS and last seen role."""

    def __init__(self, root: int, interval: float = 0.05) -> None:
        self.root, self.interval = root, interval
        self.peaks: dict[int, int] = {}
        self.roles: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> TreePeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def sample(self) -> None:
        for pid in {self.root} | descendants(self.root):
            peak, name = peak_rss(pid), role(pid)
            if peak is not None:
                self.peaks[pid] = max(peak, self.peaks.get(pid, 0))
            if name is not None:
                self.roles[pid] = name

    def by_role(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for pid, peak in self.peaks.items():
            name = self.roles.get(pid, "unknown")
            out[name] = max(out.get(name, 0), peak)
        return out


def run_measured(command: Sequence[str], *, env: dict[str, str] | None = None,
                 cwd: str | None = None, log: Path | None = None) -> dict[str, int]:
    """Run ``command`` to its end and return the peak RSS (bytes) of each role of its process
    tree; RuntimeError with the log's tail when it fails."""
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    try:
        proc = subprocess.Popen(list(command), env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        with TreePeaks(proc.pid) as tree:
            code = proc.wait()
            tree.sample()
    finally:
        if log:
            out.close()
    if code != 0:
        tail = Path(log).read_text()[-3000:] if log else ""
        raise RuntimeError(f"{' '.join(command)} exited with {code}:\n{tail}")
    return tree.by_role()


def ratio_10x(small: dict[str, int], large: dict[str, int]) -> tuple[float, str]:
    """max over roles present in both runs of peak(10 N) / peak(N), and the role it came from."""
    common = sorted(set(small) & set(large))
    if not common:
        raise ValueError("the two runs share no process role; nothing to compare")
    worst = max(common, key=lambda r: large[r] / small[r])
    return large[worst] / small[worst], worst
