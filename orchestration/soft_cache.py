"""The soft-target cache: the ensemble's ``q`` for every example of a split, on disk.

Orchestration (Ray Data) plus a plain reader. The ensemble stage builds the cache once;
distillation reads soft targets from it instead of running the routed ensemble per batch::

    from orchestration.soft_cache import SoftTargetCache
    cache = SoftTargetCache("runs/quickstart/ensemble/cache")
    cache.check_compatible(data.class_names, data_identity(config, "train", data.train))
    targets = cache.targets(batch_indices, temperature=4.0)  # (B, K) float32, rows sum to 1

Building (:func:`build_cache`): a Ray Data dataset of example ids (in blocks) goes through
``map_batches`` with a pool of actors; each actor loads the run's ensemble once (on the GPU
Ray gave it, else on one CPU thread), looks its ids up in the split's images (shared once
through the object store) and returns ``q`` at ``T = 1`` with the ids. The driver puts the
rows back in example order and writes shards of ``shard_size`` examples::

    DIR/shard_00000.values.npy     dense: float16 (n, K) q;  top-k: float16 (n, k) largest q
    DIR/shard_00000.classes.npy    top-k only: int32 (n, k) their class ids (most probable first)
    DIR/shard_00000.residual.npy   top-k only: float32 (n,) the mass of the K - k classes not kept
    DIR/shard_00000.ids.npy        int64 (n,) example ids (positions in the split)
    DIR/manifest.json              written last, atomically: without it there is no cache

The layout is dense (exact up to float16) when ``K <= dense_max_classes``, else top-k. The
cache stores ``q`` itself, never a softened copy: :meth:`SoftTargetCache.targets` softens at
read time, ``softmax(log q / T)``, so one cache serves every temperature. A top-k row is read
back as its ``k`` stored probabilities plus the residual spread uniformly over the ``K - k``
classes not stored (the maximum-entropy completion with the right total mass); entries that
are 0 (float16 underflow below ~6e-8, or a zero residual) are clamped to the smallest normal
float32 before the log. float16 keeps ~3 significant digits; probabilities below ~6e-5 lose
relative precision and below ~6e-8 read as 0, which matters only at high ``T``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from orchestration.config import ConfigError, load_config
from orchestration.parallel import TaskResources, connect, unmet_request
from orchestration.rundir import MANIFEST, read_json, sha256_file, write_json

if TYPE_CHECKING:
    from rich.console import Console

    from generalist.data import Split
    from orchestration.config import Config

FORMAT, FORMAT_VERSION = "specdistill.soft_target_cache", 1
CACHE_DIR = "cache"  # inside the ensemble stage folder
DENSE, TOPK = "dense", "topk"
SHARD = "shard_{:05d}.{}.npy"
_SHARD_FILE = re.compile(r"shard_\d{5}\.(values|classes|residual|ids)\.npy")
# Bytes of one stored item per array, and which arrays each layout has.
_ITEM_BYTES = {"values": 2, "classes": 4, "residual": 4, "ids": 8}
_DTYPES = {"values": np.float16, "classes": np.int32, "residual": np.float32, "ids": np.int64}
_ARRAYS = {DENSE: ("values", "ids"), TOPK: ("values", "classes", "residual", "ids")}
_FLOOR = torch.finfo(torch.float32).tiny
BUILD_COMMAND = "specdistill run CONFIG --from ensemble"
_SOFTEN = "stores q at T=1; soften at read time: softmax(log q / T)"
_TOPK_READ = ("top-k rows are read back as the k stored probabilities plus the residual spread "
              "uniformly over the K - k classes not stored")


class CacheMismatchError(ValueError):
    """The cache was built for other data or classes than the caller's (the message says which)."""


class CacheCorruptError(ValueError):
    """A cache file disagrees with the manifest (shape, dtype, checksum, example ids)."""


# ----------------------------------------------------------------------------- identity
def data_identity(config: Config, split_name: str, split: Split) -> dict[str, Any]:
    """What pins the examples of a cache: data set, options, seed, split, size, labels.

    The writer stores it in the manifest and the reader compares it
    (:meth:`SoftTargetCache.check_compatible`); both must compute it here.
    """
    labels = split.labels.numpy().astype("<i8", copy=False)
    return {
        "name": config.data.name,
        "options": json.loads(json.dumps(config.data.options, sort_keys=True, default=str)),
        "seed": config.run.seed,
        "split": split_name,
        "n_examples": len(split),
        "labels_sha256": hashlib.sha256(labels.tobytes()).hexdigest(),
    }


def layout_for(num_classes: int, dense_max_classes: int) -> str:
    """``dense`` when ``K <= dense_max_classes``, else ``topk``."""
    return DENSE if num_classes <= dense_max_classes else TOPK


def bytes_per_example(layout: str, num_classes: int, top_k: int) -> int:
    """Stored bytes per example (array payload, ids included; .npy headers excluded)."""
    width = num_classes if layout == DENSE else min(top_k, num_classes)
    per_item = {"values": width, "classes": width, "residual": 1, "ids": 1}
    return sum(_ITEM_BYTES[name] * per_item[name] for name in _ARRAYS[layout])


def encode(q: Tensor, layout: str, top_k: int) -> dict[str, np.ndarray]:
    """The stored arrays of ``(n, K)`` probabilities ``q`` (no ``ids``)."""
    q = q.detach().to("cpu", torch.float64)
    if layout == DENSE:
        return {"values": q.numpy().astype(np.float16)}
    values, classes = q.topk(min(top_k, q.shape[1]), dim=1)
    rest = q.scatter(1, classes, 0.0).sum(dim=1)  # the exact mass of the classes not kept
    return {"values": values.numpy().astype(np.float16), "classes": classes.numpy().astype(np.int32),
            "residual": rest.numpy().astype(np.float32)}


# ----------------------------------------------------------------------------- building
class _TeacherActor:
    """A Ray Data actor: the run's ensemble, and ``q`` for each batch of example ids."""

    def __init__(self, run_dir: str, images: list[Any], layout: str, top_k: int):
        import ray

        from orchestration.ensemble_api import Ensemble

        on_gpu = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
        if not on_gpu:
            torch.set_num_threads(1)
        self.ensemble = Ensemble.load(run_dir, device="cuda" if on_gpu else "cpu")
        self.images = ray.get(images[0])  # (N, C, H, W) uint8, shared read-only per node
        self.layout, self.top_k = layout, top_k

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = batch["id"].astype(np.int64)
        with torch.inference_mode():
            q = self.ensemble.soft_targets(torch.from_numpy(self.images[ids]))
        return {"id": ids, **encode(q, self.layout, self.top_k)}


def build_cache(
    run_dir: str | Path,
    images: Tensor,
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
    """Compute the ensemble's ``q`` of run ``run_dir`` for ``images`` with Ray Data; write the cache.

    Args:
        run_dir: a run finished up to the specialists stage (its ensemble is the teacher).
        images: ``(N, C, H, W)`` uint8, the split named in ``identity``; example id = position.
        out_dir: the cache folder; an older cache there is replaced (its manifest goes first).
        identity: :func:`data_identity` of the split.
        top_k, dense_max_classes: the layout (see the module docstring).
        shard_size: examples per shard; num_actors, gpus_per_actor: the Ray Data actor pool.
        batch_size: least examples per actor call (the ensemble batches within it itself).
        console: rich console for one progress line per shard (None: quiet).

    Uses the Ray already running in this process, else starts a private local one. Returns the
    manifest.
    """
    started = time.perf_counter()
    run_path, out = Path(run_dir).resolve(), Path(out_dir)
    n = int(images.shape[0]) if images.dim() == 4 else -1
    if images.dtype != torch.uint8 or n != identity["n_examples"]:
        raise ValueError(f"images must be the (N, C, H, W) uint8 split of the data identity "
                         f"(N={identity['n_examples']}), got {images.dtype} {tuple(images.shape)}")
    for name, value, least in (("top_k", top_k, 1), ("shard_size", shard_size, 1),
                               ("num_actors", num_actors, 1), ("batch_size", batch_size, 1)):
        if not (isinstance(value, int) and value >= least):
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    teacher, class_names = _teacher(run_path)
    num_classes = len(class_names)
    layout = layout_for(num_classes, dense_max_classes)
    k = num_classes if layout == DENSE else min(top_k, num_classes)

    batches = _compute(run_path, images, layout, k, num_actors, gpus_per_actor, batch_size, shard_size) if n else ()
    return _write(out, batches, n=n, layout=layout, k=k, num_classes=num_classes, shard_size=shard_size,
                  teacher=teacher, identity=identity, class_names=class_names, console=console,
                  started=started, extra={"actors": num_actors, "gpus_per_actor": gpus_per_actor})


def write_cache(
    out_dir: str | Path,
    q: Tensor | np.ndarray,
    *,
    class_names: Sequence[str],
    identity: Mapping[str, Any],
    teacher: Mapping[str, Any],
    top_k: int = 32,
    dense_max_classes: int = 1024,
    shard_size: int = 8192,
    console: Console | None = None,
) -> dict[str, Any]:
    """Write a cache of soft targets computed elsewhere (another teacher, a benchmark).

    ``q`` is ``(N, K)`` probabilities, row i for example id i of the split ``identity`` names;
    ``teacher`` is recorded in the manifest as the teacher's identity. Same files, layout and
    manifest as :func:`build_cache`; returns the manifest.
    """
    started = time.perf_counter()
    q = torch.as_tensor(q)
    if q.dim() != 2 or q.shape[1] != len(class_names) or q.shape[0] != identity["n_examples"]:
        raise ValueError(f"q must be (N={identity['n_examples']}, K={len(class_names)}) probabilities "
                         f"(one row per example of the split, one column per class), got {tuple(q.shape)}")
    if not (isinstance(shard_size, int) and shard_size >= 1):
        raise ValueError(f"shard_size must be an int >= 1, got {shard_size!r}")
    n, num_classes = int(q.shape[0]), int(q.shape[1])
    layout = layout_for(num_classes, dense_max_classes)
    k = num_classes if layout == DENSE else min(top_k, num_classes)
    step = 4096
    batches = ({"id": np.arange(start, min(start + step, n)), **encode(q[start:start + step], layout, k)}
               for start in range(0, n, step))
    return _write(Path(out_dir), batches, n=n, layout=layout, k=k, num_classes=num_classes,
                  shard_size=shard_size, teacher=teacher, identity=identity,
                  class_names=list(class_names), console=console, started=started, extra={})


def _write(out: Path, batches: Iterable[Mapping[str, np.ndarray]], *, n: int, layout: str, k: int,
           num_classes: int, shard_size: int, teacher: Mapping[str, Any], identity: Mapping[str, Any],
           class_names: list[str], console: Console | None, started: float,
           extra: dict[str, Any]) -> dict[str, Any]:
    """Shards from ``batches`` (``id`` + the encoded arrays, any order), then the manifest, last."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # from here on the old cache is gone
    writer = _ShardWriter(out, n, shard_size, layout, num_classes, k, console, started)
    for batch in batches:
        writer.add(batch)
    shards = writer.finish()
    _remove_stale(out, shards)
    seconds = time.perf_counter() - started
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "layout": layout,
        "num_classes": num_classes,
        "top_k": k,
        "dtypes": {name: np.dtype(_DTYPES[name]).name for name in _ARRAYS[layout]},
        "split": identity["split"],
        "n_examples": n,
        "shard_size": shard_size,
        "shards": shards,
        "teacher": dict(teacher),
        "data": dict(identity),
        "class_names": class_names,
        "targets": _SOFTEN,
        "reconstruction": _TOPK_READ if layout == TOPK else "dense: q itself (float16)",
        "bytes_per_example": bytes_per_example(layout, num_classes, k),
        "file_bytes": sum((out / f).stat().st_size for s in shards for f in s["files"].values()),
        "seconds": round(seconds, 3),
        "examples_per_s": round(n / max(seconds, 1e-9), 3),
        **extra,
        "created": time.time(),
    }
    write_json(out / MANIFEST, manifest)  # last, atomically: now the cache exists
    return manifest


def _teacher(run_path: Path) -> tuple[dict[str, Any], list[str]]:
    """Identity of the run's ensemble (weights, specialists, routing settings) and its classes."""
    # Not at module level: the stages package imports this module.
    from orchestration.stages.generalist import FINAL
    from orchestration.stages.specialists import INDEX

    weights = run_path / "generalist" / f"{FINAL}.safetensors"
    index = run_path / "specialists" / INDEX
    for path, stage in ((weights, "generalist"), (index, "specialists")):
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing: the {stage} stage of run {run_path} has not finished, so "
                f"there is no ensemble to cache; run it with `specdistill run CONFIG run.dir={run_path}`")
    meta = read_json(weights.with_suffix(".json"))
    cfg = load_config(run_path / "config.yaml").ensemble
    teacher = {"run_dir": str(run_path), "generalist_sha256": sha256_file(weights),
               "specialists_index_sha256": sha256_file(index),
               "top_n": cfg.top_n, "tol": cfg.tol, "max_iter": cfg.max_iter}
    return teacher, [str(c) for c in meta["class_names"]]


def _compute(run_path: Path, images: Tensor, layout: str, k: int, num_actors: int,
             gpus_per_actor: float, batch_size: int, shard_size: int):
    """Yield ``{"id", "values", ...}`` batches from the Ray Data actor pool, in any order."""
    import ray
    import ray.data

    if not ray.is_initialized():
        connect()
    reason = unmet_request(TaskResources(cpus=1.0, gpus=gpus_per_actor))
    if reason is not None:
        raise ConfigError(f"the soft-target cache actors cannot be scheduled: {reason}; set "
                          "ensemble.cache.gpus_per_actor=0 on CPU machines, or add GPU nodes")
    n = int(images.shape[0])
    block = max(1, min(shard_size, max(batch_size, math.ceil(n / (4 * num_actors)))))
    images_ref = ray.put(images.contiguous().numpy())
    context = ray.data.DataContext.get_current()
    bars, context.enable_progress_bars = context.enable_progress_bars, False  # one line per shard instead
    logger = logging.getLogger("ray.data")
    level = logger.level
    logger.setLevel(logging.WARNING)  # no per-dataset "Starting execution" lines
    try:
        ids = ray.data.from_numpy([np.arange(a, min(a + block, n)) for a in range(0, n, block)])
        q = ids.rename_columns({"data": "id"}).map_batches(
            _TeacherActor,
            fn_constructor_kwargs={"run_dir": str(run_path), "images": [images_ref],
                                   "layout": layout, "top_k": k},
            batch_size=block, batch_format="numpy", num_cpus=1, num_gpus=gpus_per_actor or None,
            compute=ray.data.ActorPoolStrategy(size=num_actors),
        )
        yield from q.iter_batches(batch_size=None, batch_format="numpy")
    finally:
        context.enable_progress_bars = bars
        logger.setLevel(level)


class _ShardWriter:
    """Collects rows arriving in any order; writes each shard once it and all before it are full."""

    def __init__(self, out: Path, n: int, shard_size: int, layout: str, num_classes: int, k: int,
                 console: Console | None, started: float):
        self.out, self.n, self.size, self.layout = out, n, shard_size, layout
        self.width = num_classes if layout == DENSE else k
        self.console, self.started = console, started
        self.count = math.ceil(n / shard_size)
        self.pending: dict[int, dict[str, np.ndarray]] = {}
        self.filled = np.zeros(self.count, dtype=np.int64)
        self.seen = np.zeros(n, dtype=bool)
        self.next = 0
        self.written: list[dict[str, Any]] = []

    def _rows(self, shard: int) -> int:
        return min(self.size, self.n - shard * self.size)

    def _buffer(self, shard: int) -> dict[str, np.ndarray]:
        if shard not in self.pending:
            rows = self._rows(shard)
            shapes = {"values": (rows, self.width), "classes": (rows, self.width),
                      "residual": (rows,), "ids": (rows,)}
            self.pending[shard] = {name: np.empty(shapes[name], _DTYPES[name])
                                   for name in _ARRAYS[self.layout]}
        return self.pending[shard]

    def add(self, batch: Mapping[str, np.ndarray]) -> None:
        ids = np.asarray(batch["id"], dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n or self.seen[ids].any()
                         or len(np.unique(ids)) != ids.size):
            raise RuntimeError("Ray Data returned an example id twice or out of range; the cache "
                               "was not written (run the stage again)")
        self.seen[ids] = True
        shard_of = ids // self.size
        for shard in np.unique(shard_of):
            mask = shard_of == shard
            rows = ids[mask] - shard * self.size
            buffer = self._buffer(int(shard))
            buffer["ids"][rows] = ids[mask]
            for name in _ARRAYS[self.layout]:
                if name != "ids":
                    buffer[name][rows] = batch[name][mask]
            self.filled[shard] += int(mask.sum())
        while self.next < self.count and self.filled[self.next] == self._rows(self.next):
            self._write(self.next)
            self.next += 1

    def _write(self, shard: int) -> None:
        arrays = self.pending.pop(shard)
        files, sums = {}, {}
        for name in _ARRAYS[self.layout]:
            files[name] = SHARD.format(shard, name)
            np.save(self.out / files[name], arrays[name], allow_pickle=False)
            sums[name] = sha256_file(self.out / files[name])
        first, rows = shard * self.size, self._rows(shard)
        self.written.append({"index": shard, "first_id": first, "count": rows,
                             "files": files, "sha256": sums})
        if self.console is not None:
            self.console.print(f"  cache shard {shard + 1}/{self.count}: examples {first:,}..{first + rows - 1:,} "
                               f"written ({time.perf_counter() - self.started:.1f}s)")

    def finish(self) -> list[dict[str, Any]]:
        if self.next != self.count:
            missing = int((~self.seen).sum())
            raise RuntimeError(f"Ray Data returned no soft targets for {missing} of {self.n} examples; "
                               "the cache was not written (run the stage again)")
        return self.written


def _remove_stale(out: Path, shards: list[dict[str, Any]]) -> None:
    """Shard files of an older, larger cache in the same folder."""
    keep = {f for s in shards for f in s["files"].values()}
    for path in out.iterdir():
        if _SHARD_FILE.fullmatch(path.name) and path.name not in keep:
            path.unlink()


# ----------------------------------------------------------------------------- reading
class SoftTargetCache(Dataset):
    """A built cache, memory-mapped: ``cache[i]`` is example ``i``'s ``q`` as float32 ``(K,)``.

    :meth:`targets` reads a batch softened at temperature ``T``. Opening reads only the manifest
    and the ``.npy`` headers; :meth:`verify` checks every shard's sha256 and example ids.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.exists():
            raise FileNotFoundError(_missing(self.path))
        self.manifest: dict[str, Any] = read_json(manifest_path)
        if (self.manifest.get("format") != FORMAT
                or self.manifest.get("format_version") != FORMAT_VERSION):
            raise CacheCorruptError(
                f"{manifest_path} is not a version-{FORMAT_VERSION} soft-target cache manifest "
                f"(format {self.manifest.get('format')!r}, version {self.manifest.get('format_version')!r}); "
                f"rebuild it: {BUILD_COMMAND}")
        self.class_names: list[str] = list(self.manifest["class_names"])
        self.num_classes: int = int(self.manifest["num_classes"])
        self.layout: str = self.manifest["layout"]
        self.top_k: int = int(self.manifest["top_k"])
        self.bytes_per_example: int = int(self.manifest["bytes_per_example"])
        self._shards = [self._open(shard) for shard in self.manifest["shards"]]
        self._starts = np.array([s["first_id"] for s in self.manifest["shards"]], dtype=np.int64)
        self._len = int(self.manifest["n_examples"])

    def _open(self, shard: Mapping[str, Any]) -> dict[str, np.ndarray]:
        width = self.num_classes if self.layout == DENSE else self.top_k
        rows = int(shard["count"])
        shapes = {"values": (rows, width), "classes": (rows, width), "residual": (rows,), "ids": (rows,)}
        arrays = {}
        for name in _ARRAYS[self.layout]:
            file = self.path / shard["files"][name]
            if not file.exists():
                raise FileNotFoundError(f"{file} is missing from the soft-target cache {self.path}; "
                                        f"rebuild it: {BUILD_COMMAND}")
            array = np.load(file, mmap_mode="r", allow_pickle=False)
            if array.shape != shapes[name] or array.dtype != _DTYPES[name]:
                raise CacheCorruptError(
                    f"{file} holds {array.dtype} {array.shape}, the manifest says "
                    f"{np.dtype(_DTYPES[name]).name} {shapes[name]}; rebuild the cache: {BUILD_COMMAND}")
            arrays[name] = array
        return arrays

    # Workers of a DataLoader started with spawn get the path and map the files themselves.
    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> Tensor:
        if not -self._len <= index < self._len:
            raise IndexError(f"example {index} is out of range for a cache of {self._len} examples")
        return self.targets(torch.tensor([index % self._len]))[0]

    def __repr__(self) -> str:
        return (f"SoftTargetCache({str(self.path)!r}: {self._len} examples, {self.layout}, "
                f"K={self.num_classes}, {self.bytes_per_example} bytes/example)")

    @property
    def data_identity(self) -> dict[str, Any]:
        return dict(self.manifest["data"])

    def check_compatible(self, class_names: Sequence[str], data_identity: Mapping[str, Any]) -> None:
        """Raise :class:`CacheMismatchError` naming every difference from the caller's data."""
        problems = []
        stored = self.manifest["data"]
        if stored.get("name") != data_identity.get("name"):
            problems.append(f"another data set ({stored.get('name')!r}, not {data_identity.get('name')!r})")
        if stored.get("options") != data_identity.get("options"):
            theirs, ours = stored.get("options") or {}, data_identity.get("options") or {}
            keys = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
            problems.append(f"other data options (differing: {', '.join(keys)})")
        for key, what in (("seed", "another run.seed"), ("split", "another split")):
            if stored.get(key) != data_identity.get(key):
                problems.append(f"{what} ({stored.get(key)!r}, not {data_identity.get(key)!r})")
        if stored.get("n_examples") != data_identity.get("n_examples"):
            problems.append(f"another number of examples ({stored.get('n_examples')}, not "
                            f"{data_identity.get('n_examples')})")
        elif stored.get("labels_sha256") != data_identity.get("labels_sha256"):
            problems.append("other labels for the same number of examples")
        names = [str(c) for c in class_names]
        if names != self.class_names:
            if len(names) != self.num_classes:
                problems.append(f"another class list ({self.num_classes} classes, not {len(names)})")
            else:
                i = next(i for i, (a, b) in enumerate(zip(self.class_names, names, strict=True)) if a != b)
                problems.append(f"another class list (class {i} is {self.class_names[i]!r}, not {names[i]!r})")
        if problems:
            raise CacheMismatchError(
                f"the soft-target cache {self.path} was built for {'; '.join(problems)}; rebuild it "
                f"for this data: {BUILD_COMMAND}")

    def targets(self, indices: Tensor | Sequence[int], temperature: float = 1.0) -> Tensor:
        """``(B, K)`` float32 ``softmax(log q / T)`` of the examples ``indices`` (any order, repeats ok)."""
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a positive finite number, got {temperature}")
        q = torch.from_numpy(self._gather(indices))
        return torch.softmax(q.clamp_min(_FLOOR).log() / temperature, dim=1)

    def _gather(self, indices: Tensor | Sequence[int]) -> np.ndarray:
        """``(B, K)`` float32 ``q`` as stored (top-k rows completed with the spread residual)."""
        idx = torch.as_tensor(indices).reshape(-1).cpu().numpy()
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"indices must be integers, got {idx.dtype}")
        idx = idx.astype(np.int64, copy=False)
        if idx.size and (idx.min() < 0 or idx.max() >= self._len):
            raise IndexError(f"example ids must lie in [0, {self._len}), got {int(idx.min())}..{int(idx.max())}")
        out = np.empty((idx.size, self.num_classes), dtype=np.float32)
        shard_of = np.searchsorted(self._starts, idx, side="right") - 1
        for shard in np.unique(shard_of):
            mask = shard_of == shard
            arrays, rows = self._shards[shard], idx[mask] - self._starts[shard]
            if self.layout == DENSE:
                out[mask] = arrays["values"][rows]
                continue
            rest = max(self.num_classes - self.top_k, 1)
            block = np.repeat((arrays["residual"][rows] / rest)[:, None], self.num_classes, axis=1)
            np.put_along_axis(block, arrays["classes"][rows].astype(np.int64), arrays["values"][rows], axis=1)
            out[mask] = block
        return out

    def verify(self) -> None:
        """Check every shard file's sha256 and example ids against the manifest (reads everything)."""
        for shard, arrays in zip(self.manifest["shards"], self._shards, strict=True):
            for name, file in shard["files"].items():
                if sha256_file(self.path / file) != shard["sha256"][name]:
                    raise CacheCorruptError(f"{self.path / file} changed since the cache was built "
                                            f"(sha256 differs); rebuild it: {BUILD_COMMAND}")
            expected = np.arange(shard["first_id"], shard["first_id"] + shard["count"])
            if not np.array_equal(arrays["ids"], expected):
                raise CacheCorruptError(f"shard {shard['index']} of {self.path} holds other example "
                                        f"ids than {expected[0]}..{expected[-1]}; rebuild it: {BUILD_COMMAND}")


def _missing(path: Path) -> str:
    if path.is_dir() and any(_SHARD_FILE.fullmatch(p.name) for p in path.iterdir()):
        return (f"the soft-target cache {path} is half-written (shards but no {MANIFEST}: its build "
                f"was interrupted); rebuild it with `{BUILD_COMMAND}` (ensemble.cache.enabled=true)")
    return (f"no soft-target cache at {path} (no {MANIFEST}); build it with `{BUILD_COMMAND}` "
            "(ensemble.cache.enabled=true, ensemble.cache.split = the split you need)")


def cache_dir(run_dir: str | Path) -> Path:
    """Where the ensemble stage of run ``run_dir`` writes its soft-target cache."""
    return Path(run_dir) / "ensemble" / CACHE_DIR


__all__ = [
    "BUILD_COMMAND",
    "CACHE_DIR",
    "CacheCorruptError",
    "CacheMismatchError",
    "SoftTargetCache",
    "build_cache",
    "bytes_per_example",
    "data_identity",
    "encode",
    "layout_for",
    "cache_dir",
]

