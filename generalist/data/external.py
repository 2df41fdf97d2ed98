"""Adapters for data the user brings: CIFAR-10/100 and the MNIST family.

Files are read in torchvision's on-disk layout under `root` (nothing is downloaded
unless download=True, which delegates to torchvision)::

    root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    root/cifar-100-python/{train, test, meta}
    root/{MNIST, FashionMNIST, KMNIST}/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]

The holdout split is carved from train (stratified, by seed); the test split is the
official one. Images: (N, 3, 32, 32) uint8 for CIFAR, (N, 1, 28, 28) uint8 for MNISTs.
"""

from __future__ import annotations

import gzip
import importlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from generalist.data.core import DataBundle, DataError, Split
from generalist.data.registry import check_float, check_num_classes, register_dataset
from generalist.data.splits import SPLIT_STREAM, carve, derive_seed

BUILT_IN_HINT = "The built-in data sets 'glyphs' and 'hierarchy' need no download."


@dataclass(frozen=True)
class Source:
    """Where a torchvision-format data set lives under root, and how to fetch it."""

    name: str
    folder: str  # relative to root
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    torchvision_class: str
    meta_file: str | None = None

    @property
    def files(self) -> tuple[str, ...]:
        meta = (self.meta_file,) if self.meta_file else ()
        return self.train_files + self.test_files + meta


CIFAR = {
    "cifar10": Source("cifar10", "cifar-10-batches-py",
                      tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "CIFAR10",
                      "batches.meta"),
    "cifar100": Source("cifar100", "cifar-100-python", ("train",), ("test",), "CIFAR100", "meta"),
}
MNIST_LIKE = {
    name: Source(name, os.path.join(cls, "raw"),
                 ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"), cls)
    for name, cls in (("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST"), ("kmnist", "KMNIST"))
}


def locate(source: Source, root: str | None, download: bool) -> Path:
    """The folder holding `source`'s files, downloading first if asked; else DataError."""
    if root is None:
        raise DataError(
            f"{source.name} needs root=<folder>, the folder that holds (or should hold) "
            f"'{source.folder}'. Pass root=... and download=True on a machine with internet "
            f"access, or copy the files there. {BUILT_IN_HINT}"
        )
    base = Path(os.path.expanduser(str(root)))
    if download:
        _download(source, base)
    folder = base / source.folder
    missing = [f for f in source.files if not _exists(folder / f)]
    if missing:
        raise DataError(
            f"{source.name}: data not found under root {str(base)!r}: looked for "
            f"{[str(folder / f) for f in missing]}. Fix: pass download=True on a machine with "
            f"internet access (torchvision saves the files under root), or copy the "
            f"'{source.folder}' folder there. {BUILT_IN_HINT}"
        )
    return folder


def source_files(name: str, root: str | None) -> list[Path]:
    """The files data set `name` (a key of CIFAR or MNIST_LIKE) is read from under `root`, as they
    are on disk (``.gz`` where gzipped); DataError naming what is missing when they are not there."""
    source = {**CIFAR, **MNIST_LIKE}[name]
    folder = locate(source, root, download=False)
    return [path if path.is_file() else path.with_name(path.name + ".gz")
            for path in (folder / f for f in source.files)]


def _exists(path: Path) -> bool:
    return path.is_file() or path.with_name(path.name + ".gz").is_file()


def _download(source: Source, base: Path) -> None:
    import torchvision.datasets

    cls = getattr(torchvision.datasets, source.torchvision_class)
    try:
        for train in (True, False):
            cls(str(base), train=train, download=True)
    except Exception as err:  # network errors come in many types
        raise DataError(
            f"{source.name}: download to {str(base)!r} failed ({err}); check the internet "
            f"connection, or copy the '{source.folder}' folder there and pass "
            f"download=False. {BUILT_IN_HINT}"
        ) from err


# The only globals a CIFAR batch or meta pickle refers to: numpy array and dtype reconstruction
# (numpy 1 and 2 spell the module differently; protocol 5 pickles use _frombuffer) and, in
# pickles Python 3 wrote at protocol 2, bytes rebuilt with _codecs.encode. Anything else (a
# reduce to os.system, builtins.eval, ...) is refused before it is called.
CIFAR_PICKLE_GLOBALS = frozenset({
    (module, name)
    for prefix in ("numpy.core", "numpy._core")
    for module, name in ((f"{prefix}.multiarray", "_reconstruct"), (f"{prefix}.multiarray", "scalar"),
                         (f"{prefix}.numeric", "_frombuffer"))
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")})


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles plain data (dicts, lists, bytes, str, numbers) and numpy arrays, nothing else."""

    def find_class(self, module: str, name: str):
        if (module, name) not in CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which the CIFAR format never needs")
        if module.startswith("numpy.core") and hasattr(np, "_core"):  # numpy 2 moved numpy.core
            module = "numpy._core" + module[len("numpy.core"):]
        return getattr(importlib.import_module(module), name)


def read_pickle(path: Path) -> dict:
    """A CIFAR batch / meta pickle with str keys (files are Python 2 pickles), read by an unpickler
    that admits only what the CIFAR format holds (:data:`CIFAR_PICKLE_GLOBALS`)."""
    try:
        with open(path, "rb") as handle:
            raw = _CifarUnpickler(handle, encoding="latin1").load()
    except pickle.UnpicklingError as err:
        raise DataError(f"refused to read {path}: {err}; it is not a CIFAR python batch file (and was "
                        "not run). Delete it and download the data set again.") from None
    except (OSError, EOFError, ValueError) as err:
        raise DataError(f"cannot read {path} ({err}); delete it and download again.") from err
    if not isinstance(raw, dict):
        raise DataError(f"{path} holds a {type(raw).__name__}, not a CIFAR batch (a dict); delete it "
                        "and download again.")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def read_cifar(folder: Path, files: tuple[str, ...], label_key: str) -> tuple[Split, np.ndarray]:
    """Concatenated CIFAR batches: (Split of (N, 3, 32, 32) uint8, raw dicts' coarse labels)."""
    batches = [read_pickle(folder / f) for f in files]
    try:
        data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
        coarse = np.concatenate([np.asarray(b.get("coarse_labels", []), np.int64) for b in batches])
        images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    except (KeyError, ValueError) as err:
        raise DataError(
            f"CIFAR files {[str(folder / f) for f in files]} are malformed ({err!r}); "
            "delete them and download again."
        ) from err
    return Split(images, torch.from_numpy(labels)), coarse


def read_idx(path: Path) -> np.ndarray:
    """An IDX (MNIST) file, optionally gzipped, as a uint8 array of its stored shape."""
    path = path if path.is_file() else path.with_name(path.name + ".gz")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file; delete it and download again.")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated ({body.size} of {int(np.prod(shape))} values); "
                        "delete it and download again.")
    return body.reshape(shape)


def read_mnist(folder: Path, files: tuple[str, str]) -> Split:
    """(images, labels) IDX files -> Split of (N, 1, 28, 28) uint8."""
    images, labels = read_idx(folder / files[0]), read_idx(folder / files[1])
    return Split(torch.from_numpy(images.copy()).unsqueeze(1),
                 torch.from_numpy(labels.astype(np.int64)))


def finish(name: str, class_names: list[str], train: Split, test: Split, seed: int,
           holdout_fraction: float, num_classes: int | None, info: dict,
           holdout: Split | None = None) -> DataBundle:
    """Check num_classes, carve the stratified holdout from train (unless one is given), build
    the bundle."""
    check_num_classes(name, num_classes, len(class_names))
    fraction = check_float("holdout_fraction", holdout_fraction, minimum=0.0, maximum=1.0,
                           max_inclusive=False)
    if holdout is None:
        train, holdout = carve(train, fraction, derive_seed(seed, SPLIT_STREAM["holdout"]))
    info = {**info, "holdout_fraction": fraction}
    return DataBundle(name, tuple(class_names), train, holdout, test, info)


def build_cifar(source: Source, root: str | None, seed: int, download: bool,
                holdout_fraction: float, num_classes: int | None) -> DataBundle:
    folder = locate(source, root, download)
    fine = source.name == "cifar100"
    label_key = "fine_labels" if fine else "labels"
    meta = read_pickle(folder / source.meta_file)
    names_key = "fine_label_names" if fine else "label_names"
    if names_key not in meta:
        raise DataError(f"{folder / source.meta_file} has no {names_key!r}; delete it and "
                        "download again.")
    names = [str(n) for n in meta[names_key]]
    train, coarse = read_cifar(folder, source.train_files, label_key)
    test, _ = read_cifar(folder, source.test_files, label_key)
    info = {"root": str(folder)}
    if fine and len(coarse) == len(train):
        info["superclass_of"] = _superclass_of(train.labels.numpy(), coarse, len(names))
        info["superclass_names"] = [str(n) for n in meta.get("coarse_label_names", [])]
    return finish(source.name, names, train, test, seed, holdout_fraction, num_classes, info)


def _superclass_of(fine: np.ndarray, coarse: np.ndarray, num_classes: int) -> list[int]:
    """Coarse label of each fine class (first occurrence; -1 if a class never occurs)."""
    mapping = [-1] * num_classes
    for f, c in zip(fine.tolist(), coarse.tolist(), strict=True):
        if mapping[f] < 0:
            mapping[f] = c
    return mapping


def build_mnist_like(source: Source, root: str | None, seed: int, download: bool,
                     holdout_fraction: float, num_classes: int | None) -> DataBundle:
    import torchvision.datasets

    folder = locate(source, root, download)
    train = read_mnist(folder, source.train_files)
    test = read_mnist(folder, source.test_files)
    names = list(getattr(torchvision.datasets, source.torchvision_class).classes)
    info = {"root": str(folder)}
    return finish(source.name, names, train, test, seed, holdout_fraction, num_classes, info)


def _register(source: Source) -> None:
    build = build_cifar if source.name in CIFAR else build_mnist_like

    def builder(*, root: str | None = None, seed: int = 0, download: bool = False,
                holdout_fraction: float = 0.1, num_classes: int | None = None) -> DataBundle:
        return build(source, root, seed, bool(download), holdout_fraction, num_classes)

    builder.__name__ = f"build_{source.name}"
    builder.__doc__ = f"{source.name} from torchvision's files under root (see module doc)."
    register_dataset(source.name)(builder)


for _source in (*CIFAR.values(), *MNIST_LIKE.values()):
    _register(_source)
