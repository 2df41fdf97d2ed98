"""Per-group review numbers against a hand-computed confusion, and the montage's layout."""

from __future__ import annotations

import numpy as np

from clustering.review import ConfusionCounts, group_montage, group_stats

# Holdout: class 0 -> 0 x3, 0 -> 1 x1; class 1 -> 1 x2, 1 -> 0 x2; class 2 -> 2 x4, 2 -> 0 x1.
COUNTS = ConfusionCounts(true=np.array([0, 0, 1, 1, 2, 2]), predicted=np.array([0, 1, 1, 0, 2, 0]),
                         count=np.array([3, 1, 2, 2, 4, 1]))


def test_group_accuracy_share_and_pairs_match_the_hand_count():
    stats = group_stats(COUNTS, [0, 1])
    assert stats.examples == 8 and stats.accuracy == 5 / 8
    assert stats.confusion_share == 3 / 4          # 1 + 2 of the 4 off-diagonal confusions
    assert stats.pairs == [(1, 0, 2), (0, 1, 1)]


def test_a_group_without_confusions_between_its_classes():
    stats = group_stats(COUNTS, [1, 2], top=1)
    assert stats.examples == 9 and stats.accuracy == 6 / 9
    assert stats.confusion_share == 0.0 and stats.pairs == []


def test_montage_has_one_row_per_class_with_its_name():
    images = [np.zeros((3, 1, 8, 8), np.uint8), np.full((2, 1, 8, 8), 255, np.uint8)]
    fig = group_montage(images, ["a", "b"], "group 0")
    (ax,) = fig.get_axes()
    (shown,) = ax.images
    tiles = np.asarray(shown.get_array())
    assert tiles.shape == (2 * 8 + 1, 3 * 8 + 2)                    # 2 rows, 3 columns, 1-px gaps
    assert [label.get_text() for label in ax.get_yticklabels()] == ["a", "b"]
    assert (tiles[:8, :8] == 0).all() and (tiles[9:, 18:] == 128).all()  # class b has two images
    assert (tiles[9:, :8] == 255).all() and (tiles[9:, 9:17] == 255).all()


def test_montage_shows_colour_and_two_channel_images():
    colour = np.zeros((1, 3, 8, 8), np.uint8)
    colour[0, 0] = 255                                              # pure red
    fig = group_montage([colour, np.full((1, 2, 8, 8), 7, np.uint8)], ["red", "two"], "g")
    tiles = np.asarray(fig.get_axes()[0].images[0].get_array())
    assert tiles.shape == (17, 8, 3)
    assert tuple(tiles[0, 0]) == (255, 0, 0)
    assert tuple(tiles[9, 0]) == (7, 7, 7)                          # the first channel, as grey
