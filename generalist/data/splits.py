"""Deterministic randomness and stratified splitting shared by all data sets."""

from __future__ import annotations

import numpy as np
import torch

from generalist.data.core import Split

SPLIT_STREAM = {"train": 0, "holdout": 1, "test": 2}


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that depends on every key (e.g. seed, split id, class id)."""
    words = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return int((int(words[0]) << 31) ^ int(words[1]))


def generator(*keys: int) -> torch.Generator:
    """A CPU torch.Generator seeded from `keys` via `derive_seed`."""
    gen = torch.Generator()
    gen.manual_seed(derive_seed(*keys))
    return gen


def stratified_indices(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split positions per class into (keep, carved), carving round(fraction * n_c) of class c.

    labels: (N,) int. A class with at least 2 samples keeps at least one and, when
    fraction > 0, gives at least one. Both outputs are sorted int64 positions.
    """
    rng = np.random.default_rng(seed)
    keep, carved = [], []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        members = members[rng.permutation(len(members))]
        take = int(round(fraction * len(members)))
        if fraction > 0 and len(members) >= 2:
            take = min(max(take, 1), len(members) - 1)
        carved.append(members[:take])
        keep.append(members[take:])
    return _sorted_cat(keep), _sorted_cat(carved)


def _sorted_cat(parts: list[np.ndarray]) -> np.ndarray:
    if not parts:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(parts)).astype(np.int64)


def carve(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Stratified (rest, carved) of `split`; `carved` holds ~`fraction` of each class."""
    keep, carved = stratified_indices(split.labels.numpy(), fraction, seed)
    return split.subset(keep), split.subset(carved)


def shuffled(split: Split, *keys: int) -> Split:
    """`split` in a random order determined by `keys` (so prefixes mix classes)."""
    order = torch.randperm(len(split), generator=generator(*keys))
    return split.subset(order)
