"""The private local Ray of a laptop run: loopback only, and no processes left behind.

**Loopback.** ``ray.init`` resolves a node address of ``127.0.0.1`` to the machine's reachable
address (``_node_ip_address`` does not help), so a default local Ray listens on every interface:
the GCS server, the raylet, every worker's and actor's gRPC server, the dashboard and runtime-env
agents, the autoscaler monitor's and the dashboard's metrics ports. Ray keeps everything on
loopback only in its single-machine mode, the one macOS and Windows get by default
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``); :func:`loopback_only` turns that mode on while the
private Ray starts, so every component binds ``127.0.0.1``. A cluster (``ray.address``, ``ray job
submit``) is never started this way.

**Leftovers.** When the driver is killed (``kill -9``), Ray's dashboard and runtime-env agents
outlive it and keep listening. Each driver records the Ray processes it started (pid and start
time) in ``RECORDS/<driver pid>.json`` (``RECORDS`` = ``$TMPDIR/specdistill-<uid>/local-ray``);
the next private start stops the recorded processes of every driver that is gone (SIGKILL: they
belong to a dead session), checking each one's start time so a reused pid is never touched. A
driver that exits normally shuts its Ray down and removes its record. Linux only (``/proc``).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

RECORDS = Path(tempfile.gettempdir()) / f"specdistill-{os.getuid()}" / "local-ray"
PROC = Path("/proc")


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """Ray's single-machine mode (every component on 127.0.0.1) while the private Ray starts."""
    from ray._private import ray_constants  # the switch RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER sets

    previous = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous


def record_started() -> None:
    """Record the Ray processes this driver started (call once its private Ray is up)."""
    if not PROC.is_dir():
        return
    me = os.getpid()
    processes = [[pid, _start_time(pid)] for pid in sorted(descendants(me)) if _is_ray(pid)]
    RECORDS.mkdir(parents=True, exist_ok=True)
    path = RECORDS / f"{me}.json"
    path.write_text(json.dumps({"driver": [me, _start_time(me)], "processes": processes}))
    atexit.register(path.unlink, missing_ok=True)


def reap_leftovers() -> int:
    """Stop the recorded Ray processes of drivers that are gone; returns how many were alive."""
    if not RECORDS.is_dir():
        return 0
    stopped = 0
    for path in RECORDS.glob("*.json"):
        try:
            record = json.loads(path.read_text())
            driver, processes = record["driver"], record["processes"]
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)
            continue
        if _alive(*driver):
            continue
        for pid, started in processes:
            if _alive(pid, started):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                stopped += 1
        path.unlink(missing_ok=True)
    return stopped


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _stat(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` after the command name: state, ppid, ... (None once it is gone)."""
    try:
        return (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[19]) if fields else None   # field 22 of stat: start time in clock ticks


def _alive(pid: int, started: int | None) -> bool:
    """The process ``pid`` that started at ``started`` still runs (not a zombie, not a reuse)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z" and int(fields[19]) == started


def _is_ray(pid: int) -> bool:
    try:
        cmdline = (PROC / str(pid) / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return cmdline.startswith("ray::") or f"{os.sep}ray{os.sep}" in cmdline
