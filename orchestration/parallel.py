"""Ray, and only Ray: connect to a cluster, check a resource request fits, run tasks.

Each item runs as one plain Ray task (``@ray.remote``) with its own CPUs/GPUs. A task whose
worker process or node dies is retried by Ray up to ``max_retries`` times (application
errors are not retried: they would fail again); the task function itself resumes from its
checkpoint, so a retry continues instead of starting over. At most ``max_concurrency`` tasks
are in flight; while waiting, ``on_tick`` is called about once a second (progress output).

Where Ray runs (``connect``):

- an explicit address (``ray://...``, ``HOST:PORT``, ``auto``): attach to that cluster;
- no address under ``ray job submit`` (``RAY_ADDRESS`` is set): attach to the job's cluster;
- otherwise: start a private local Ray (``address="local"``, never someone else's cluster),
  listening on 127.0.0.1 only, after stopping what a killed earlier one left running
  (:mod:`orchestration.local_ray`).

A Ray already initialised in this process is used as is.

The private local Ray gives its workers an empty working directory of their own (runtime_env
``working_dir``). Without one, Ray puts the driver's working directory (and its script's
folder) on every worker's ``sys.path``; when that is a run directory, its stage folders
(``clustering/``, ``specialists/``, ...) shadow the packages as empty namespace packages and
the workers cannot import them. With a ``working_dir`` Ray adds neither, and relative paths
behave as on a cluster: everything a task gets is an absolute path. ``ray job submit
--working-dir`` (the cluster path) already gives the job a ``working_dir``, so Ray does not add
the driver's folder there either.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayTaskError

from orchestration.local_ray import loopback_only, reap_leftovers, record_started

POLL_SECONDS = 1.0


@dataclass(frozen=True)
class TaskResources:
    """What one task reserves: CPUs and (possibly fractional) GPUs on a single node."""

    cpus: float = 1.0
    gpus: float = 0.0


@dataclass(frozen=True)
class TaskFailure:
    """An item that failed: the exception (the task's own, or why its worker died)."""

    item: Any
    error: BaseException


class WorkerLostError(RuntimeError):
    """A task's worker or node died more often than ``max_retries`` allowed."""


def connect(address: str | None = None, *, local_num_cpus: int | None = None) -> str:
    """Attach to / start Ray (see the module docstring); returns a description of it.

    Ray stays up for the rest of the process, so later stages and later runs in the same
    process (a notebook, the test suite) reuse it and its warm workers; Ray shuts it down when
    the process exits. A Ray already initialised in this process is used as is.
    """
    if ray.is_initialized():
        return f"the Ray already running in this process ({_cpus()} CPUs)"
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, logging_level=logging.WARNING)
        return f"Ray cluster at {address or os.environ['RAY_ADDRESS']}"
    stopped = reap_leftovers()
    with tempfile.TemporaryDirectory(prefix="specdistill-ray-") as empty, loopback_only(), _quiet(AUTH_LOGGER):
        ray.init(address="local", num_cpus=local_num_cpus, include_dashboard=False,
                 dashboard_host="127.0.0.1", logging_level=logging.WARNING,
                 runtime_env={"working_dir": empty})  # the folder is uploaded by init
    record_started()
    note = f"; stopped {stopped} processes an earlier local Ray left running" if stopped else ""
    return f"local Ray on 127.0.0.1 ({_cpus()} CPUs{note})"


# Announces on every start that a new local Ray uses token authentication (its default): nothing
# a user of the private Ray can act on. Its other warnings are errors and still print.
AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Logger ``name`` prints errors only while the block runs."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _cpus() -> int:
    return int(ray.cluster_resources().get("CPU", 0))


def cluster_summary() -> str:
    """E.g. ``2 nodes: 8 CPU; 4 CPU + 1 GPU`` (alive nodes only)."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    parts = [" + ".join(f"{r[k]:g} {k}" for k in ("CPU", "GPU") if r.get(k)) or "no CPU"
             for r in nodes]
    return f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}: {'; '.join(parts)}"


def unmet_request(resources: TaskResources) -> str | None:
    """Why no alive node can ever run a task with ``resources`` (None when one can).

    Ray would keep such a task pending forever; callers fail fast with this reason instead.
    """
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    total_gpus = sum(r.get("GPU", 0.0) for r in nodes)
    if resources.gpus > 0 and total_gpus == 0:
        return f"{resources.gpus:g} GPU per task requested but the cluster has no GPUs ({cluster_summary()})"
    fits = [r for r in nodes if r.get("CPU", 0.0) >= resources.cpus and r.get("GPU", 0.0) >= resources.gpus]
    if not fits:
        return (f"{resources.cpus:g} CPU + {resources.gpus:g} GPU per task requested but no node "
                f"has that much ({cluster_summary()})")
    return None


def run_tasks(
    fn: Callable[..., Any],
    items: Sequence[Any],
    *,
    shared: Any,
    resources: TaskResources,
    max_concurrency: int | None = None,
    max_retries: int = 3,
    on_result: Callable[[Any, Any], None] | None = None,
    on_tick: Callable[[], None] | None = None,
) -> list[TaskFailure]:
    """Run ``fn(item, shared)`` for every item as a Ray task; returns the failures.

    ``shared`` is put in the object store once and handed to every task. ``on_result(item,
    result)`` is called in the driver as each task finishes. Tasks keep running when another
    fails; the failures come back in completion order.
    """
    remote = ray.remote(fn).options(
        num_cpus=resources.cpus, num_gpus=resources.gpus,
        max_retries=max_retries, retry_exceptions=False,
    )
    shared_ref = ray.put(shared)
    waiting = list(items)
    running: dict[ray.ObjectRef, Any] = {}
    failures: list[TaskFailure] = []
    limit = max_concurrency or len(waiting) or 1
    while waiting or running:
        while waiting and len(running) < limit:
            item = waiting.pop(0)
            running[remote.remote(item, shared_ref)] = item
        done, _ = ray.wait(list(running), num_returns=1, timeout=POLL_SECONDS)
        if on_tick is not None:
            on_tick()
        for ref in done:
            item = running.pop(ref)
            try:
                result = ray.get(ref)
            except RayTaskError as exc:
                failures.append(TaskFailure(item, exc.cause or exc))
                continue
            except ray.exceptions.RayError as exc:  # worker/node died after every retry
                failures.append(TaskFailure(item, WorkerLostError(
                    f"its worker died {max_retries + 1} times ({type(exc).__name__}: {exc})")))
                continue
            if on_result is not None:
                on_result(item, result)
    return failures
