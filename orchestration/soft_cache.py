"""Building the soft-target cache with Ray Data, and the data identity it is checked against.

The ensemble stage builds the cache once; distillation reads soft targets from it instead of
running the routed ensemble per batch (the format, writer and memory-mapped reader are
:mod:`specialists.ensemble`'s: :class:`~specialists.ensemble.SoftTargetCache`)::

    cache = SoftTargetCache(cache_dir("runs/quickstart"))
    cache.check_compatible(source.class_names, data_identity(config, "train", source))

:func:`build_cache`: a Ray Data dataset of example ids (in blocks) goes through ``map_batches``
with a pool of actors; each actor loads the run's ensemble once (on the GPU Ray gave it, else
on one CPU thread) and the split's source (:mod:`orchestration.data_access`: in-memory arrays
shared once through the object store, or a streaming source that re-opens its files), reads its
block with ``take`` a batch at a time and returns ``q`` at ``T = 1``, encoded for the cache, with
the ids. The driver hands the batches to :func:`specialists.ensemble.write_shards`, which puts
the rows back in example order, writes shards of ``shard_size`` examples and the manifest, last.
With a streaming source nothing holds the split: an actor decodes one batch of images at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from generalist.data import Split
from generalist.data.source import ExampleSource
from orchestration.artifacts import (
    CONFIG,
    MODEL,
    SPECIALISTS_INDEX,
    generalist_metadata,
    load_ensemble,
    specialist_temperature,
    specialists_index,
    stage_dir,
)
from orchestration.config import ConfigError, load_config
from orchestration.data_access import SourceDescriptor, open_descriptor, source_descriptor
from orchestration.files import sha256_file
from orchestration.parallel import TaskResources, connect, unmet_request
from orchestration.ray_data import quiet_ordered_data
from specialists.ensemble import CacheLayout, RoutedEnsemble, ensemble_soft_targets, write_shards
from specialists.ensemble.cache_writer import check_count

if TYPE_CHECKING:
    from rich.console import Console

    from orchestration.config import Config


def data_identity(config: Config, split_name: str, examples: Split | ExampleSource) -> dict[str, Any]:
    """What pins the examples of a cache: data set, options, seed, split, size, labels.

    ``examples`` is the split itself or a source whose split ``split_name`` is meant (its labels
    come from the per-class positions, no image is read); both give the same identity. The
    writer stores it in the manifest and the reader compares it
    (:meth:`~specialists.ensemble.SoftTargetCache.check_compatible`); both must compute it here.
    """
    labels = examples.labels.numpy() if isinstance(examples, Split) else split_labels(examples, split_name)
    labels = labels.astype("<i8", copy=False)                                  # (N,)
    return {
        "name": config.data.name,
        "options": json.loads(json.dumps(config.data.options, sort_keys=True, default=str)),
        "seed": config.run.seed,
        "split": split_name,
        "n_examples": len(labels),
        "labels_sha256": hashlib.sha256(labels.tobytes()).hexdigest(),
    }


def split_labels(source: ExampleSource, split: str) -> np.ndarray:
    """``(N,)`` int64: the label of every example of ``split``, by position, assembled from the
    source's per-class positions (no image is read)."""
    labels = np.empty(source.size(split), dtype=np.int64)                      # (N,)
    for label in np.flatnonzero(source.class_counts(split)):
        labels[source.class_positions(split, [int(label)])] = label
    return labels


def actor_ensemble(run_dir: str, settings: Mapping[str, Any]) -> tuple[RoutedEnsemble, torch.device]:
    """The run's ensemble as a Ray actor loads it, once: on the GPU Ray gave the actor, else on
    the CPU with one thread (the actor's one CPU); routing and solver from ``settings``
    (``top_n``, ``tol``, ``max_iter``). Returns it and its device."""
    import ray

    on_gpu = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
    if not on_gpu:
        torch.set_num_threads(1)
    device = torch.device("cuda" if on_gpu else "cpu")
    loaded = load_ensemble(Path(run_dir), top_n=settings["top_n"], tol=settings["tol"],
                           max_iter=settings["max_iter"], device=device)
    return loaded.ensemble, device


class _TeacherActor:
    """A Ray Data actor: the run's ensemble, and the encoded ``q`` for each batch of example ids."""

    def __init__(self, run_dir: str, descriptor: list[Any], split: str, layout: CacheLayout,
                 settings: dict[str, Any]):
        import ray

        self.batch_size = settings["batch_size"]
        self.ensemble = actor_ensemble(run_dir, settings)[0]
        self.source = open_descriptor(ray.get(descriptor[0]))
        self.split, self.layout = split, layout

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = batch["id"].astype(np.int64)                                      # (b,)
        parts = [self._encoded(ids[i:i + self.batch_size]) for i in range(0, len(ids), self.batch_size)]
        return {"id": ids, **{key: np.concatenate([part[key] for part in parts]) for key in parts[0]}}

    @torch.inference_mode()
    def _encoded(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        """The cache's arrays of the examples at ``positions`` (one ensemble batch at most)."""
        x = self.source.take(self.split, positions).images.float() / 255      # (b, C, H, W) in [0, 1]
        q = ensemble_soft_targets(self.ensemble, x, batch_size=self.batch_size)  # (b, K) at T = 1
        return self.layout.encode(q)


def build_cache(
    run_dir: str | Path,
    examples: ExampleSource | Tensor,
    out_dir: str | Path,
    *,
    identity: Mapping[str, Any],
    top_k: int = 32,
    dense_max_classes: int = 1024,
    shard_size: int = 8192,
    num_actors: int = 2,
    gpus_per_actor: float = 0.0,
    batch_size: int = 512,
    console: Console | None = None,
) -> dict[str, Any]:
    """Compute the ensemble's ``q`` of run ``run_dir`` for a split with Ray Data; write the cache.

    Args:
        run_dir: a run finished up to the specialists stage (its ensemble is the teacher).
        examples: the data: a source, whose split named in ``identity`` the actors read block by
            block, or that split's ``(N, C, H, W)`` uint8 images in memory; example id = position.
        out_dir: the cache folder; an older cache there is replaced (its manifest goes first).
        identity: :func:`data_identity` of the split.
        top_k, dense_max_classes: the layout (:class:`~specialists.ensemble.CacheLayout`).
        shard_size: examples per shard; num_actors, gpus_per_actor: the Ray Data actor pool.
        batch_size: least examples per actor call (the ensemble batches within it itself).
        console: rich console for one progress line per shard (None: quiet).

    Uses the Ray already running in this process, else starts a private local one. Returns the
    manifest.
    """
    started = time.perf_counter()
    run_path, out = Path(run_dir).resolve(), Path(out_dir)
    descriptor, n = _descriptor(examples, identity)
    for name, value in (("top_k", top_k), ("shard_size", shard_size), ("num_actors", num_actors),
                        ("batch_size", batch_size)):
        check_count(name, value)
    teacher, class_names, settings = _teacher(run_path)
    layout = CacheLayout.choose(len(class_names), top_k, dense_max_classes)
    batches = _compute(run_path, descriptor, identity["split"], n, layout, settings, num_actors,
                       gpus_per_actor, batch_size, shard_size) if n else ()
    return write_shards(out, batches, layout, n=n, shard_size=shard_size, teacher=teacher,
                        identity=identity, class_names=class_names,
                        progress=console.print if console is not None else None, started=started,
                        extra={"actors": num_actors, "gpus_per_actor": gpus_per_actor})


def _descriptor(examples: ExampleSource | Tensor, identity: Mapping[str, Any]) -> tuple[SourceDescriptor, int]:
    """What the actors read the split of ``identity`` from, and its number of examples."""
    split, expected = identity["split"], identity["n_examples"]
    if not isinstance(examples, Tensor):
        if examples.size(split) != expected:
            raise ValueError(f"the {split} split of {examples.name!r} has {examples.size(split)} examples "
                             f"but the data identity says {expected}; compute the identity from the "
                             "same data (data_identity)")
        return source_descriptor(examples, (split,)), expected
    if examples.dtype != torch.uint8 or examples.dim() != 4 or examples.shape[0] != expected:
        raise ValueError(f"images must be the (N, C, H, W) uint8 split of the data identity "
                         f"(N={expected}), got {examples.dtype} {tuple(examples.shape)}")
    # Images alone: the actors read images only, so their labels are placeholders.
    return {f"{split}_images": examples, f"{split}_labels": torch.zeros(expected, dtype=torch.int64)}, expected


def _teacher(run_path: Path) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    """Identity of the run's ensemble (weights, specialists, routing settings), its classes, and
    the settings its actors load it with (routing, solver and batch size of the run's config)."""
    meta = generalist_metadata(run_path)
    specialists_index(run_path)  # the specialists stage has finished
    cfg = load_config(run_path / CONFIG).ensemble
    weights = stage_dir(run_path, "generalist") / f"{MODEL}.safetensors"
    index = stage_dir(run_path, "specialists") / SPECIALISTS_INDEX
    teacher = {"run_dir": str(run_path), "generalist_sha256": sha256_file(weights),
               "specialists_index_sha256": sha256_file(index),
               "top_n": cfg.top_n, "tol": cfg.tol, "max_iter": cfg.max_iter,
               "specialist_temperature": specialist_temperature(run_path)}
    settings = {"top_n": cfg.top_n, "tol": cfg.tol, "max_iter": cfg.max_iter, "batch_size": cfg.batch_size}
    return teacher, [str(c) for c in meta["class_names"]], settings


def _compute(run_path: Path, descriptor: SourceDescriptor, split: str, n: int, layout: CacheLayout,
             settings: dict[str, Any], num_actors: int, gpus_per_actor: float, batch_size: int,
             shard_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Yield ``{"id", "values", ...}`` batches from the Ray Data actor pool, in example order."""
    import ray
    import ray.data

    if not ray.is_initialized():
        connect()
    reason = unmet_request(TaskResources(cpus=1.0, gpus=gpus_per_actor))
    if reason is not None:
        raise ConfigError(f"the soft-target cache actors cannot be scheduled: {reason}; set "
                          "ensemble.cache.gpus_per_actor=0 on CPU machines, or add GPU nodes")
    block = max(1, min(shard_size, max(batch_size, math.ceil(n / (4 * num_actors)))))
    descriptor_ref = ray.put(descriptor)
    with quiet_ordered_data():  # one progress line per shard instead of Ray Data's
        ids = ray.data.from_numpy([np.arange(a, min(a + block, n)) for a in range(0, n, block)])
        q = ids.rename_columns({"data": "id"}).map_batches(
            _TeacherActor,
            fn_constructor_kwargs={"run_dir": str(run_path), "descriptor": [descriptor_ref], "split": split,
                                   "layout": layout, "settings": settings},
            batch_size=block, batch_format="numpy", num_cpus=1, num_gpus=gpus_per_actor or None,
            # no more actors than blocks: an actor without a block would sit idle (and Ray Data warns)
            compute=ray.data.ActorPoolStrategy(size=min(num_actors, math.ceil(n / block))),
        )
        yield from q.iter_batches(batch_size=None, batch_format="numpy")
