"""Tests for specialists.sampler: half-and-half batches, determinism, target mapping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from specialists.sampler import HalfAndHalfBatchSampler, in_group_mask, specialist_targets

GROUP = (2, 5)


def make_labels() -> np.ndarray:
    """100 labels over 10 classes: class 2 has 7 examples, class 5 has 5 (12 in-group)."""
    counts = [10, 12, 7, 14, 9, 5, 11, 10, 12, 10]
    labels = np.repeat(np.arange(10), counts)
    return np.random.default_rng(0).permutation(labels)


def test_each_batch_is_half_in_group() -> None:
    labels = make_labels()
    sampler = HalfAndHalfBatchSampler(labels, GROUP, batch_size=8, num_batches=20, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 20
    for batch in batches:
        assert len(batch) == 8
        assert all(isinstance(i, int) for i in batch)
        n_in = int(np.isin(labels[batch], GROUP).sum())
        assert n_in == 4
    assert sampler.in_group_fraction == 0.5


def test_odd_batch_size_rounding() -> None:
    labels = make_labels()
    sampler = HalfAndHalfBatchSampler(labels, GROUP, batch_size=7, num_batches=5)
    assert (sampler.in_per_batch, sampler.out_per_batch) == (3, 4)
    assert sampler.in_group_fraction == pytest.approx(3 / 7)
    for batch in sampler:
        assert len(batch) == 7
        assert int(np.isin(labels[batch], GROUP).sum()) == 3


def test_default_num_batches_is_one_pass_over_in_group() -> None:
    labels = make_labels()
    # 12 in-group examples, 4 per batch -> 3 batches, each in-group example exactly once.
    sampler = HalfAndHalfBatchSampler(labels, GROUP, batch_size=8)
    assert len(sampler) == 3
    drawn = [i for b in sampler for i in b if labels[i] in GROUP]
    assert sorted(drawn) == sorted(np.flatnonzero(np.isin(labels, GROUP)).tolist())
    # 5 per batch -> ceil(12 / 5) = 3 batches
    assert len(HalfAndHalfBatchSampler(labels, GROUP, batch_size=10)) == 3


def test_uniform_draws_counts_differ_by_at_most_one() -> None:
    labels = make_labels()
    sampler = HalfAndHalfBatchSampler(labels, GROUP, batch_size=16, num_batches=30, seed=1)
    counts = np.bincount([i for b in sampler for i in b], minlength=len(labels))
    in_mask = np.isin(labels, GROUP)
    in_counts, out_counts = counts[in_mask], counts[~in_mask]
    # 240 in-group draws over 12 examples = exactly 20 each; 240 over 88 -> 2 or 3 each.
    assert in_counts.min() == in_counts.max() == 20
    assert out_counts.sum() == 240
    assert (out_counts.min(), out_counts.max()) == (2, 3)


def test_deterministic_given_seed_and_epoch() -> None:
    labels = torch.as_tensor(make_labels())
    a = list(HalfAndHalfBatchSampler(labels, GROUP, batch_size=8, num_batches=6, seed=7))
    b = list(HalfAndHalfBatchSampler(labels, GROUP, batch_size=8, num_batches=6, seed=7))
    assert a == b
    c = list(HalfAndHalfBatchSampler(labels, GROUP, batch_size=8, num_batches=6, seed=8))
    assert a != c
    s = HalfAndHalfBatchSampler(labels, GROUP, batch_size=8, num_batches=6, seed=7)
    s.set_epoch(1)
    e1 = list(s)
    assert e1 != a
    assert e1 == list(HalfAndHalfBatchSampler(labels, GROUP, batch_size=8, num_batches=6, seed=7,
                                              epoch=1))
    s.set_epoch(0)
    assert list(s) == a
    assert list(s) == a  # re-iterating the same epoch repeats it


def test_within_batch_order_is_mixed() -> None:
    labels = make_labels()
    sampler = HalfAndHalfBatchSampler(labels, GROUP, batch_size=8, num_batches=50)
    first_half_in = [int(np.isin(labels[b[:4]], GROUP).sum()) for b in sampler]
    assert min(first_half_in) < 4  # not always "in-group first"


def test_works_as_dataloader_batch_sampler() -> None:
    labels = torch.as_tensor(make_labels())
    ds = TensorDataset(torch.arange(len(labels)), labels)
    sampler = HalfAndHalfBatchSampler(labels, GROUP, batch_size=6, num_batches=4)
    batches = list(DataLoader(ds, batch_sampler=sampler))
    assert len(batches) == 4
    for idx, y in batches:
        assert idx.shape == (6,)
        targets = specialist_targets(y, GROUP)
        assert int((targets < 2).sum()) == 3


def test_specialist_targets_hand_values() -> None:
    labels = torch.tensor([3, 7, 2, 7, 0])
    assert specialist_targets(labels, (7, 2)).tolist() == [2, 0, 1, 0, 2]
    out = specialist_targets(np.array([[9, 1], [1, 4]]), [1, 9])
    assert out.dtype == torch.long and out.tolist() == [[1, 0], [0, 2]]
    # group ids above every label are fine (no example of that class)
    assert specialist_targets(torch.tensor([0, 1]), (50, 1)).tolist() == [2, 1]
    assert in_group_mask(labels, (7,)).tolist() == [False, True, False, True, False]


@pytest.mark.parametrize(
    ("labels", "group", "kwargs", "match"),
    [
        (np.array([0, 1, 3]), (2,), {"batch_size": 4}, "no training example has a label"),
        (np.array([2, 2, 5]), (2, 5), {"batch_size": 4}, "nothing to fill the out-of-group"),
        (np.array([0, 2]), (2,), {"batch_size": 1}, "batch_size must be an int >= 2"),
        (np.array([0, 2]), (2,), {"batch_size": 4, "num_batches": 0}, "num_batches"),
        (np.array([0, 2]), (2,), {"batch_size": 4, "seed": -1}, "seed"),
        (np.array([0.0, 2.0]), (2,), {"batch_size": 4}, "integer class ids"),
        (np.array([-1, 2]), (2,), {"batch_size": 4}, "non-negative"),
        (np.array([[0, 2]]), (2,), {"batch_size": 4}, "1-D"),
        (np.array([0, 2]), (2, 2), {"batch_size": 4}, "duplicate"),
        (np.array([0, 2]), (), {"batch_size": 4}, "group is empty"),
    ],
)
def test_sampler_errors(labels: np.ndarray, group: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HalfAndHalfBatchSampler(labels, group, **kwargs)


def test_set_epoch_rejects_negative() -> None:
    sampler = HalfAndHalfBatchSampler(np.array([0, 2]), (2,), batch_size=2)
    with pytest.raises(ValueError, match="epoch"):
        sampler.set_epoch(-1)
