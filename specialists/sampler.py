"""Half-and-half batch sampling and target mapping for specialists (DESIGN §2.2).

A specialist is trained on batches where half the examples have a label in its group
``S_m`` and the other half come from the rest of the training set (the paper's 50/50 mix).
Within each half, examples are drawn uniformly. The resulting prior shift is undone after
training with :mod:`specialists.prior`, using :attr:`HalfAndHalfBatchSampler.in_group_fraction`.

Only the positions of the group's own examples and the split size are needed
(:meth:`HalfAndHalfBatchSampler.from_positions`, :func:`balanced_positions`): the rest are the
positions not in the group, drawn by rank (:func:`rest_positions`) without reading a label, so
a specialist reads from a streamed data set only the examples it trains on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Sampler

from specialists.model import validate_group

__all__ = ["HalfAndHalfBatchSampler", "balanced_positions", "in_group_mask", "rest_positions",
           "specialist_targets"]


def _as_label_tensor(labels: Tensor | np.ndarray) -> Tensor:
    """Integer labels of any shape as a tensor (no copy when already a tensor)."""
    if isinstance(labels, np.ndarray):
        labels = torch.from_numpy(labels)
    if not isinstance(labels, Tensor):
        raise ValueError(f"labels must be a torch.Tensor or numpy.ndarray, got "
                         f"{type(labels).__name__}; wrap lists with torch.tensor(...)")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}; "
                         "convert with labels.long()")
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"labels must be non-negative class ids, got min {int(labels.min())}; "
                         "drop ignored/unlabelled examples first")
    return labels


def _lookup_table(labels: Tensor, ids: tuple[int, ...]) -> Tensor:
    """Table indexed by class id: position in ``ids`` for group classes, ``len(ids)`` else."""
    top = max(max(ids), int(labels.max()) if labels.numel() else 0) + 1
    table = torch.full((top,), len(ids), dtype=torch.long, device=labels.device)
    table[torch.tensor(ids, dtype=torch.long, device=labels.device)] = torch.arange(
        len(ids), device=labels.device)
    return table


def specialist_targets(labels: Tensor | np.ndarray, group: Sequence[int]) -> Tensor:
    """Map original labels to specialist targets.

    Args:
        labels: integer class ids of any shape (e.g. ``(N,)``).
        group: class ids ``S_m`` in the specialist's output order.

    Returns:
        ``torch.long`` tensor of the same shape (and device, for tensor input): the position
        of the label in ``group`` when it is in ``S_m``, else the dustbin index ``len(group)``.
    """
    ids = validate_group(group)
    lab = _as_label_tensor(labels)
    if lab.numel() == 0:
        return torch.empty(lab.shape, dtype=torch.long, device=lab.device)
    return _lookup_table(lab, ids)[lab.long()]


def in_group_mask(labels: Tensor | np.ndarray, group: Sequence[int]) -> Tensor:
    """Boolean tensor, same shape as ``labels``: True where the label is in ``group``."""
    ids = validate_group(group)
    lab = _as_label_tensor(labels)
    if lab.numel() == 0:
        return torch.zeros(lab.shape, dtype=torch.bool, device=lab.device)
    return _lookup_table(lab, ids)[lab.long()] < len(ids)


def rest_positions(in_positions: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """The positions of rank ``ranks (M,)`` among those not in ``in_positions`` (sorted, (G,)):
    rank r is the r-th position of ``0, 1, 2, ...`` that is not in the group."""
    shifted = in_positions - np.arange(len(in_positions))    # (G,) non-decreasing
    return ranks + np.searchsorted(shifted, ranks, side="right")


def _stream(size: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` draws of ranks ``0..size-1``: concatenated random permutations (each example is used
    once per pass; it repeats only after the whole pool has been used)."""
    reps = math.ceil(n / size)
    return np.concatenate([rng.permutation(size) for _ in range(reps)])[:n]


def balanced_positions(in_positions: np.ndarray, size: int, *, seed: int) -> np.ndarray:
    """Positions ``(M,)`` in a split of ``size`` examples whose group examples are at
    ``in_positions`` (sorted): all of them, then an equal number (or all, if fewer) drawn uniformly
    without replacement from the others, sorted. Deterministic given ``seed``; the same examples
    as :func:`specialists.train.balanced_holdout` of the split's labels."""
    inside = np.asarray(in_positions, dtype=np.int64)
    if len(inside) == 0:
        raise ValueError("no holdout example has a label in the group; the specialist cannot be "
                         "early-stopped: raise the holdout size")
    n_out = size - len(inside)
    rng = np.random.default_rng([seed, size])
    ranks = rng.choice(n_out, size=min(len(inside), n_out), replace=False)
    return np.concatenate([inside, np.sort(rest_positions(inside, ranks))])


class HalfAndHalfBatchSampler(Sampler[list[int]]):
    """Batch sampler yielding half in-group, half out-of-group example indices.

    Each batch of ``batch_size`` indices holds ``in_per_batch = batch_size // 2`` examples
    whose label is in ``group`` and ``out_per_batch = batch_size - in_per_batch`` examples
    from the rest of the training set (so for odd ``batch_size`` the out-of-group half gets
    the extra example; :attr:`in_group_fraction` is the exact mix to pass to
    :func:`specialists.prior.dustbin_log_correction`). The order within a batch is shuffled.

    Each half is drawn uniformly: the sampler walks random permutations of the in-group
    (resp. out-of-group) indices and starts a fresh permutation when one is used up, so an
    example repeats only after all examples of its half have been drawn (sampling with
    replacement "when needed", with counts differing by at most one). Near a permutation
    boundary a batch can contain the same index twice.

    Deterministic given ``(seed, epoch)``; call :meth:`set_epoch` each epoch for new draws.
    Not sharded across distributed workers: give each rank a different ``seed``. Memory: the
    group's positions, plus one permutation of the rest's ranks per pass over it (8 bytes per
    example outside the group, no labels); :meth:`from_positions` needs no labels at all.

    Args:
        labels: ``(N,)`` integer labels of the training set (tensor or numpy array).
        group: class ids ``S_m``.
        batch_size: indices per batch, >= 2.
        num_batches: batches per epoch; default ``ceil(n_in / in_per_batch)``, i.e. about one
            pass over the in-group examples (and as many out-of-group ones: ~2 x n_in total).
        seed, epoch: non-negative ints seeding ``numpy.random.default_rng([seed, epoch])``.
    """

    def __init__(self, labels: Tensor | np.ndarray, group: Sequence[int], *, batch_size: int,
                 num_batches: int | None = None, seed: int = 0, epoch: int = 0) -> None:
        super().__init__()
        lab = _as_label_tensor(labels)
        if lab.dim() != 1:
            raise ValueError(f"labels must be 1-D (N,), got shape {tuple(lab.shape)}; "
                             "flatten them with labels.reshape(-1)")
        mask = in_group_mask(lab, validate_group(group)).cpu().numpy()
        self._setup(np.flatnonzero(mask), len(mask), group, batch_size, num_batches, seed, epoch)

    @classmethod
    def from_positions(cls, in_positions: np.ndarray, size: int, group: Sequence[int], *, batch_size: int,
                       num_batches: int | None = None, seed: int = 0, epoch: int = 0) -> HalfAndHalfBatchSampler:
        """The sampler of a training set of ``size`` examples whose group examples are at the
        sorted ``in_positions (M,)`` (e.g. ``source.class_positions("train", group)``); the same
        batches as the sampler of the set's labels."""
        sampler = cls.__new__(cls)
        Sampler.__init__(sampler)
        sampler._setup(np.asarray(in_positions, dtype=np.int64), int(size), group, batch_size,
                       num_batches, seed, epoch)
        return sampler

    def _setup(self, in_positions: np.ndarray, size: int, group: Sequence[int], batch_size: int,
               num_batches: int | None, seed: int, epoch: int) -> None:
        self.group: tuple[int, ...] = validate_group(group)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
            raise ValueError(f"batch_size must be an int >= 2 (half in-group, half out), got "
                             f"{batch_size!r}")
        self.in_indices: np.ndarray = in_positions          # (M,) sorted positions in the group
        self.n_out = size - len(in_positions)               # examples of the rest
        if len(self.in_indices) == 0:
            raise ValueError(f"no training example has a label in group {self.group}; check "
                             "the group's class ids against the training labels")
        if self.n_out == 0:
            raise ValueError(f"every training example has a label in group {self.group}, so "
                             "there is nothing to fill the out-of-group half; a specialist "
                             "needs examples outside its group")
        self.batch_size = batch_size
        self.in_per_batch = batch_size // 2
        self.out_per_batch = batch_size - self.in_per_batch
        if num_batches is None:
            num_batches = math.ceil(len(self.in_indices) / self.in_per_batch)
        if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
        self.num_batches = num_batches
        self.seed = self._check_nonneg("seed", seed)
        self.epoch = self._check_nonneg("epoch", epoch)

    @staticmethod
    def _check_nonneg(name: str, value: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        return value

    @property
    def in_group_fraction(self) -> float:
        """Fraction of each batch drawn from the group (0.5 for even ``batch_size``)."""
        return self.in_per_batch / self.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Select the draws of ``epoch`` (deterministic given ``(seed, epoch)``)."""
        self.epoch = self._check_nonneg("epoch", epoch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        ins = self.in_indices[_stream(len(self.in_indices), self.num_batches * self.in_per_batch, rng)]
        outs = rest_positions(self.in_indices, _stream(self.n_out, self.num_batches * self.out_per_batch, rng))
        ins = ins.reshape(self.num_batches, self.in_per_batch)
        outs = outs.reshape(self.num_batches, self.out_per_batch)
        for b in range(self.num_batches):
            batch = rng.permutation(np.concatenate([ins[b], outs[b]]))
            yield batch.tolist()
