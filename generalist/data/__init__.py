"""Data layer of the generalist: every data set as in-memory uint8 splits.

    bundle = create_dataset("glyphs", seed=0)          # built in, offline
    bundle.train.images                                # (N, C, H, W) uint8
    bundle.train.labels                                # (N,) int64 in [0, K)
"""

from generalist.data import external, glyphs, hierarchy, image_folder, packed  # noqa: F401  (registers)
from generalist.data.core import DataBundle, DataError, Split, to_float
from generalist.data.registry import (
    create_dataset,
    dataset_options,
    list_datasets,
    register_dataset,
)

__all__ = [
    "DataBundle",
    "DataError",
    "Split",
    "create_dataset",
    "dataset_options",
    "list_datasets",
    "register_dataset",
    "to_float",
]
