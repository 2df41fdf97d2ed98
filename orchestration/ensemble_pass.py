"""The ensemble stage's evaluation, block by block: in this process, or on Ray Data actors.

Two passes score the routed ensemble: the holdout split at several specialist temperatures (the
stage keeps the one whose ``q`` has the lowest negative log-likelihood), and the test split (the
labels, the top-1 of the generalist, of the ensemble and of the same-compute generalist if the
run has one, and the active specialists per example). A split's positions are cut into blocks of
whole batches; :func:`score_block` reads a block with ``take`` a batch at a time and returns its
partial result, a :class:`NllPartial` or a :class:`PredictionPartial`; the driver merges the
blocks in order::

    scorer = Scorer(ensemble, same_compute=None, batch_size=512, device=torch.device("cpu"))
    nll = holdout_nll(scorer, source, (1.0, 2.0), pool=Pool())                # {T: mean NLL}
    test = predict_test(scorer, source, pool=Pool(run_dir, actors=2))    # on Ray Data

With ``pool.actors == 0`` the blocks are scored here with the driver's models (in-memory data:
Ray Data's start-up costs more than the pass). Otherwise a Ray Data dataset of block starts goes
through ``map_batches`` with a pool of actors, each loading the run's ensemble (and the
same-compute model) once and re-opening the split's source (:mod:`orchestration.data_access`), so
the driver never holds the split. Blocks hold whole batches, so a block's NLL sums are those of
the batches of one pass over the split and the merged result does not depend on the blocks.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from generalist.data.source import ExampleSource
from orchestration.artifacts import load_same_compute
from orchestration.config import ConfigError
from orchestration.covariance_job import ARROW_LOGGER
from orchestration.data_access import open_descriptor, source_descriptor
from orchestration.parallel import TaskResources, unmet_request
from orchestration.ray_data import quiet_ordered_data
from orchestration.soft_cache import actor_ensemble
from specialists.ensemble import RoutedEnsemble, ensemble_forward, ensemble_forward_at

HOLDOUT, TEST = "holdout", "test"
BATCHES_PER_BLOCK = 32   # at most: a block's results are a few arrays of its examples


@dataclass(frozen=True)
class Scorer:
    """What scores a block: the routed ensemble (at the test split's specialist temperature),
    the same-compute generalist (None: the run has none), the batch size and the device."""

    ensemble: RoutedEnsemble
    same_compute: torch.nn.Module | None
    batch_size: int
    device: torch.device


@dataclass(frozen=True)
class Pool:
    """Where the blocks are scored: ``actors == 0`` in this process; else on that many Ray Data
    actors (at most one per block) of ``gpus_per_actor`` GPUs each (0: one CPU), which load the
    models from the finished run ``run_dir``."""

    run_dir: Path | None = None
    actors: int = 0
    gpus_per_actor: float = 0.0


@dataclass
class NllPartial:
    """Holdout examples scored: minus the log ``q`` of the true class, summed per batch
    (rows, in split order) at each temperature (columns), and the number of examples."""

    batch_nll: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))   # (batches, T) float64
    count: int = 0

    def merge(self, other: NllPartial) -> None:
        self.batch_nll = other.batch_nll if not self.count else np.concatenate([self.batch_nll, other.batch_nll])
        self.count += other.count

    def mean_nll(self) -> list[float]:
        """Per temperature, the mean NLL: the batch sums added in split order, over the count."""
        means = []
        for column in self.batch_nll.T:
            total = 0.0
            for value in column:
                total += float(value)
            means.append(total / self.count)
        return means


@dataclass
class PredictionPartial:
    """Test examples scored, ``(b,)`` int64 arrays in split order: ``labels``, ``general`` and
    ``combined`` top-1, ``n_active`` specialists, ``same_compute`` top-1 (None: no such model);
    the largest change of every batch whose fixed point did not converge, and the seconds spent
    in the routed ensemble."""

    labels: list[np.ndarray] = field(default_factory=list)
    general: list[np.ndarray] = field(default_factory=list)
    combined: list[np.ndarray] = field(default_factory=list)
    n_active: list[np.ndarray] = field(default_factory=list)
    same_compute: list[np.ndarray] | None = None
    unconverged: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def merge(self, other: PredictionPartial) -> None:
        for name in ("labels", "general", "combined", "n_active", "unconverged"):
            getattr(self, name).extend(getattr(other, name))
        if other.same_compute is not None:
            self.same_compute = (self.same_compute or []) + other.same_compute
        self.seconds += other.seconds

    def arrays(self) -> dict[str, torch.Tensor | None]:
        """``labels``, ``general``, ``combined``, ``n_active``, ``same_compute``: (N,) int64 each."""
        out: dict[str, torch.Tensor | None] = {
            name: torch.from_numpy(np.concatenate(getattr(self, name) or [np.zeros(0, np.int64)]))
            for name in ("labels", "general", "combined", "n_active")}
        out["same_compute"] = (None if self.same_compute is None
                               else torch.from_numpy(np.concatenate(self.same_compute)))
        return out


def _read(scorer: Scorer, source: ExampleSource, split: str, start: int,
          stop: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x (B, C, H, W) float32 in [0, 1], y (B,))`` on the scorer's device, batch by batch."""
    for begin in range(start, stop, scorer.batch_size):
        batch = source.take(split, np.arange(begin, min(begin + scorer.batch_size, stop)))
        yield batch.images.to(scorer.device).float().div_(255.0), batch.labels.to(scorer.device)


@torch.no_grad()
def nll_block(scorer: Scorer, source: ExampleSource, start: int, stop: int,
                  temperatures: Sequence[float]) -> NllPartial:
    """Holdout positions ``start..stop-1``: minus log ``q`` of the true class per batch and temperature."""
    sums, count = [], 0
    for x, y in _read(scorer, source, HOLDOUT, start, stop):
        outs = ensemble_forward_at(scorer.ensemble, x, temperatures)   # the models run once
        sums.append([-float(out.q.gather(1, y.view(-1, 1)).clamp_min(1e-12).log().sum()) for out in outs])
        count += len(y)
    return NllPartial(np.array(sums, dtype=np.float64).reshape(len(sums), len(temperatures)), count)


@torch.no_grad()
def prediction_block(scorer: Scorer, source: ExampleSource, start: int, stop: int) -> PredictionPartial:
    """Test positions ``start..stop-1``: labels, top-1 predictions and active specialists."""
    part = PredictionPartial(same_compute=None if scorer.same_compute is None else [])
    for x, y in _read(scorer, source, TEST, start, stop):
        started = time.perf_counter()
        out = ensemble_forward(scorer.ensemble, x)
        part.general.append(out.p_general.argmax(dim=1).cpu().numpy())
        part.combined.append(out.q.argmax(dim=1).cpu().numpy())
        part.n_active.append(out.active.sum(dim=1).cpu().numpy())
        part.seconds += time.perf_counter() - started
        part.labels.append(y.cpu().numpy())
        if not out.info["converged"]:
            part.unconverged.append(float(out.info["max_change"]))
        if part.same_compute is not None:
            part.same_compute.append(scorer.same_compute(x).argmax(dim=1).cpu().numpy())
    return part


def score_block(scorer: Scorer, source: ExampleSource, split: str, start: int, stop: int,
                temperatures: Sequence[float]) -> NllPartial | PredictionPartial:
    """The partial result of positions ``start..stop-1`` of ``split`` (``holdout`` or ``test``)."""
    if split == HOLDOUT:
        return nll_block(scorer, source, start, stop, temperatures)
    return prediction_block(scorer, source, start, stop)


def block_starts(n: int, batch_size: int, actors: int) -> tuple[int, list[int]]:
    """Block size (whole batches, about 4 blocks per actor) and the starts of the blocks."""
    batches = math.ceil(math.ceil(n / (4 * max(1, actors))) / batch_size) if n else 1
    block = batch_size * max(1, min(batches, BATCHES_PER_BLOCK))
    return block, list(range(0, n, block))


def holdout_nll(scorer: Scorer, source: ExampleSource, temperatures: Sequence[float], *,
                pool: Pool) -> dict[float, float]:
    """``{T: mean NLL of q on the holdout split}`` for each specialist temperature ``T``."""
    total = NllPartial()
    for part in _parts(scorer, source, HOLDOUT, tuple(temperatures), pool):
        total.merge(part)
    return dict(zip(temperatures, total.mean_nll(), strict=True))


def predict_test(scorer: Scorer, source: ExampleSource, *, pool: Pool) -> PredictionPartial:
    """The test split scored by the ensemble (and the same-compute generalist), merged in order."""
    total = PredictionPartial(same_compute=None if scorer.same_compute is None else [])
    for part in _parts(scorer, source, TEST, (), pool):
        total.merge(part)
    return total


def _parts(scorer: Scorer, source: ExampleSource, split: str, temperatures: tuple[float, ...],
           pool: Pool) -> Iterable[NllPartial | PredictionPartial]:
    n = source.size(split)
    block, starts = block_starts(n, scorer.batch_size, pool.actors)
    if not pool.actors:
        return (score_block(scorer, source, split, s, min(s + block, n), temperatures) for s in starts)
    return _on_ray(scorer, source, split, temperatures, pool, block, starts)


class _EnsembleActor:
    """A Ray Data actor: the run's ensemble (and same-compute model) and the split's source."""

    def __init__(self, run_dir: str, descriptor: list[Any], settings: dict[str, Any], split: str,
                 temperatures: tuple[float, ...], block: int, n: int):
        import ray

        # A block's result is a Python object Arrow has no type for: Ray Data stores it pickled,
        # as it should, after announcing that once per worker; say nothing instead.
        logging.getLogger(ARROW_LOGGER).setLevel(logging.ERROR)
        ensemble, device = actor_ensemble(run_dir, settings)
        ensemble = replace(ensemble, specialist_temperature=settings["specialist_temperature"])
        loaded = load_same_compute(run_dir) if settings["same_compute"] else None
        self.scorer = Scorer(ensemble, None if loaded is None else loaded[0].to(device),
                             settings["batch_size"], device)
        self.source = open_descriptor(ray.get(descriptor[0]))
        self.split, self.temperatures, self.block, self.n = split, temperatures, block, n

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One row per block start: the block's partial result."""
        parts = [score_block(self.scorer, self.source, self.split, int(s), min(int(s) + self.block, self.n),
                             self.temperatures) for s in batch["start"]]
        return {"start": batch["start"], "partial": np.array(parts, dtype=object)}


def _actor_settings(scorer: Scorer) -> dict[str, Any]:
    """How an actor rebuilds the driver's scorer from the run directory."""
    e = scorer.ensemble
    return {"top_n": e.top_n, "tol": e.tol, "max_iter": e.max_iter, "batch_size": scorer.batch_size,
            "specialist_temperature": e.specialist_temperature, "same_compute": scorer.same_compute is not None}


def _on_ray(scorer: Scorer, source: ExampleSource, split: str, temperatures: tuple[float, ...],
            pool: Pool, block: int, starts: list[int]) -> Iterator[NllPartial | PredictionPartial]:
    """The blocks' partial results from the Ray Data actor pool, in split order."""
    import ray
    import ray.data

    reason = unmet_request(TaskResources(cpus=1.0, gpus=pool.gpus_per_actor))
    if reason is not None:
        raise ConfigError(f"the ensemble evaluation actors cannot be scheduled: {reason}; set "
                          "ensemble.cache.gpus_per_actor=0 on CPU machines, or add GPU nodes")
    descriptor = ray.put(source_descriptor(source, (split,)))
    with quiet_ordered_data():
        blocks = ray.data.from_numpy([np.array([s], dtype=np.int64) for s in starts])  # a Ray block each
        parts = blocks.rename_columns({"data": "start"}).map_batches(
            _EnsembleActor, batch_size=1, batch_format="numpy", num_cpus=1,
            num_gpus=pool.gpus_per_actor or None,
            fn_constructor_kwargs={"run_dir": str(pool.run_dir), "descriptor": [descriptor],
                                   "settings": _actor_settings(scorer), "split": split,
                                   "temperatures": temperatures, "block": block, "n": source.size(split)},
            compute=ray.data.ActorPoolStrategy(size=max(1, min(pool.actors, len(starts)))),
        )
        for batch in parts.iter_batches(batch_size=None, batch_format="numpy"):
            yield from batch["partial"]
