"""Half-and-half batches and the balanced holdout from the group's positions alone: the same
examples as from the split's labels, the rest found by rank without reading a label."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specialists.sampler import HalfAndHalfBatchSampler, balanced_positions, rest_positions
from specialists.train import balanced_holdout


def test_rest_positions_by_rank_hand_values():
    # positions 0..7 with the group at 1, 2, 5: the rest is 0, 3, 4, 6, 7
    assert rest_positions(np.array([1, 2, 5]), np.array([0, 1, 2, 3, 4])).tolist() == [0, 3, 4, 6, 7]
    assert rest_positions(np.array([0, 1]), np.array([2, 0])).tolist() == [4, 2]
    assert rest_positions(np.zeros(0, np.int64), np.array([3])).tolist() == [3]


@pytest.mark.parametrize("batch_size", [8, 9])
def test_sampler_from_positions_draws_the_batches_of_the_labels(batch_size):
    labels = torch.from_numpy(np.random.default_rng(0).integers(0, 7, size=301))  # (N,)
    group = (5, 2)
    by_labels = HalfAndHalfBatchSampler(labels, group, batch_size=batch_size, num_batches=40, seed=3)
    inside = np.flatnonzero(np.isin(labels.numpy(), group))
    by_positions = HalfAndHalfBatchSampler.from_positions(inside, len(labels), group, batch_size=batch_size,
                                                          num_batches=40, seed=3)
    for epoch in (0, 4):
        by_labels.set_epoch(epoch)
        by_positions.set_epoch(epoch)
        assert list(by_positions) == list(by_labels)
    assert by_positions.in_group_fraction == by_labels.in_group_fraction


def test_from_positions_refuses_a_group_with_nothing_outside():
    with pytest.raises(ValueError, match="nothing to fill the out-of-group half"):
        HalfAndHalfBatchSampler.from_positions(np.arange(5), 5, (0,), batch_size=4)


def test_balanced_positions_are_the_balanced_holdout_of_the_labels():
    labels = torch.from_numpy(np.random.default_rng(1).integers(0, 9, size=250))
    for group, seed in (((0, 4, 8), 11), ((3,), 2)):
        inside = np.flatnonzero(np.isin(labels.numpy(), group))
        expected = balanced_holdout(labels, group, seed=seed).numpy()
        np.testing.assert_array_equal(balanced_positions(inside, len(labels), seed=seed), expected)


def test_balanced_positions_take_all_others_when_fewer():
    assert balanced_positions(np.array([0, 1, 2, 4]), 6, seed=0).tolist() == [0, 1, 2, 4, 3, 5]
    with pytest.raises(ValueError, match="raise the holdout size"):
        balanced_positions(np.zeros(0, np.int64), 6, seed=0)
