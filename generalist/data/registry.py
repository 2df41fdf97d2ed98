"""Registry of data sets by name (timm style) and `create_dataset`.

A builder is a function taking keyword-only arguments `root`, `seed` and its options::

    @register_dataset("glyphs")
    def build_glyphs(*, root=None, seed=0, num_classes=None, ...) -> DataBundle

The names live in `DATASETS`, a :class:`generalist.registry.Registry` (normalised names,
"did you mean" for unknown ones, duplicates refused; errors are `DataError`). The option
names a data set accepts are read from its builder's signature, so an unknown option is
rejected with the list of valid ones.
"""

from __future__ import annotations

import contextlib
import inspect
import numbers
from collections.abc import Callable, Iterator

import torch

from generalist.data.core import DataBundle, DataError
from generalist.registry import Registry, normalise_name

Builder = Callable[..., DataBundle]

DATASETS: Registry[Builder] = Registry(
    "data set", error=DataError, hint="Register new ones with @register_dataset(name)."
)
_RESERVED = ("root", "seed")


def register_dataset(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering `builder(*, root, seed, **options) -> DataBundle` under `name`."""
    return DATASETS.register(name)


def list_datasets() -> list[str]:
    """Names accepted by `create_dataset`, sorted."""
    return DATASETS.names()


def dataset_options(name: str) -> list[str]:
    """The option names (besides root and seed) that data set `name` accepts."""
    params = inspect.signature(DATASETS.get(name)).parameters
    return [p for p in params if p not in _RESERVED]


def create_dataset(name: str, *, root: str | None = None, seed: int = 0, **options) -> DataBundle:
    """Build data set `name` deterministically from `seed` (same seed, same bytes)."""
    valid = dataset_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise DataError(
            f"data set {normalise_name(name)!r} got unknown option(s) {unknown}; valid options "
            f"are {valid} (plus root and seed)."
        )
    seed = check_int("seed", seed, minimum=0)
    with single_threaded():
        return DATASETS.get(name)(root=root, seed=seed, **options)


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch ops on one intra-op thread, restoring the previous count afterwards.

    Generation is many mid-sized ops; on a busy machine each multi-threaded op can wait
    a scheduler tick (~16 ms) for its OpenMP team (measured: 23 s vs 4 s for the
    default glyphs). One thread also makes the bytes independent of the thread count.
    Note torch's thread count is process-wide while this runs.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def check_int(name: str, value: object, *, minimum: int | None = None,
              maximum: int | None = None) -> int:
    """`value` as an int within [minimum, maximum], else a DataError naming the option."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise DataError(f"option {name} must be an integer, got {value!r}; pass e.g. {name}=10.")
    value = int(value)
    if minimum is not None and value < minimum:
        raise DataError(f"option {name}={value} is too small; pass an integer >= {minimum}.")
    if maximum is not None and value > maximum:
        raise DataError(f"option {name}={value} is too large; pass an integer <= {maximum}.")
    return value


def check_float(name: str, value: object, *, minimum: float, maximum: float,
                max_inclusive: bool = True) -> float:
    """`value` as a float within [minimum, maximum] (or [minimum, maximum)), else DataError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise DataError(f"option {name} must be a number, got {value!r}; pass e.g. {name}=0.1.")
    value = float(value)
    above = value > maximum if max_inclusive else value >= maximum
    if not minimum <= value or above:
        bracket = "]" if max_inclusive else ")"
        raise DataError(
            f"option {name}={value} is out of range; pass a number in [{minimum}, {maximum}{bracket}."
        )
    return value


def check_num_classes(name: str, requested: int | None, available: int) -> None:
    """For fixed-class data sets: `num_classes`, if given, must equal the data's class count."""
    if requested is None:
        return
    requested = check_int("num_classes", requested, minimum=1)
    if requested != available:
        raise DataError(
            f"data set {name!r} has {available} classes but num_classes={requested} was "
            f"requested; pass num_classes={available} or leave it unset (None)."
        )
