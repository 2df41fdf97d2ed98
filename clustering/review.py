"""What a person needs to judge a group by eye: a montage of its classes' images, its most
confused pairs, the generalist's accuracy inside it and its share of the confusion mass.

The holdout confusion counts are sparse triples (``true``, ``predicted``, ``count``: examples of
class ``true`` the generalist predicted as ``predicted``), so any K fits in memory. Figures are on the Agg canvas (no pyplot state); the caller logs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["ConfusionCounts", "GroupStats", "group_montage", "group_stats"]


@dataclass(frozen=True)
class ConfusionCounts:
    """Sparse holdout confusion counts: three ``(P,)`` arrays."""

    true: np.ndarray
    predicted: np.ndarray
    count: np.ndarray

    @property
    def off_diagonal_total(self) -> int:
        return int(self.count[self.true != self.predicted].sum())


@dataclass(frozen=True)
class GroupStats:
    """One group on the holdout split."""

    examples: int                                # holdout examples whose class is in the group
    accuracy: float                              # generalist top-1 on them (nan without examples)
    confusion_share: float                       # share of all off-diagonal confusions inside it
    pairs: list[tuple[int, int, int]]            # (true, predicted, count), most confused first


def group_stats(counts: ConfusionCounts, group: Sequence[int], top: int = 10) -> GroupStats:
    """The generalist's holdout accuracy inside ``group`` (class ids), its confusions between the
    group's classes (the ``top`` largest) and their share of all off-diagonal confusions."""
    members = np.isin(counts.true, np.asarray(group))
    inside = members & np.isin(counts.predicted, np.asarray(group))
    examples = int(counts.count[members].sum())
    correct = int(counts.count[members & (counts.true == counts.predicted)].sum())
    confused = inside & (counts.true != counts.predicted)
    total = counts.off_diagonal_total
    order = np.argsort(-counts.count[confused], kind="stable")[:top]
    pairs = [(int(t), int(p), int(c)) for t, p, c in zip(counts.true[confused][order],
                                                         counts.predicted[confused][order],
                                                         counts.count[confused][order], strict=True)]
    return GroupStats(examples, correct / examples if examples else float("nan"),
                      float(counts.count[confused].sum() / total) if total else 0.0, pairs)


def group_montage(images: Sequence[np.ndarray], names: Sequence[str], title: str) -> Figure:
    """One row per class: its images ``(n, C, H, W) uint8`` (C = 1 or 3), its name beside them.

    The images are tiled into one array shown by a single ``imshow`` (a grid of one axes per
    image takes a second per group to lay out and draw); empty cells and the gaps between
    cells are mid grey. The montage is colour when any image is, grey otherwise."""
    cols = max(1, max(len(x) for x in images))
    colour = any(x.shape[1] >= 3 for x in images if len(x))
    height = max((x.shape[2] for x in images if len(x)), default=1)
    width = max((x.shape[3] for x in images if len(x)), default=1)
    pad = max(1, max(height, width) // 16)
    rows = len(images)
    canvas = np.full((rows * (height + pad) - pad, cols * (width + pad) - pad, *((3,) if colour else ())),
                     MONTAGE_BACKGROUND, np.uint8)
    for row, batch in enumerate(images):
        for col, image in enumerate(batch):
            shown = _display(image)                                        # (h, w[, 3])
            if colour and shown.ndim == 2:
                shown = np.repeat(shown[:, :, None], 3, axis=2)
            top, left = row * (height + pad), col * (width + pad)
            canvas[top:top + shown.shape[0], left:left + shown.shape[1]] = shown
    fig = Figure(figsize=(1.2 * cols + 2.4, 1.2 * rows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(canvas, cmap=None if colour else "gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([row * (height + pad) + height / 2 - 0.5 for row in range(rows)], list(names), fontsize=18)
    ax.tick_params(length=0)
    ax.set_frame_on(False)
    fig.suptitle(title, fontsize=13)
    return fig


MONTAGE_BACKGROUND = 128  # empty cells and the gaps between images


def _display(image: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` -> ``(H, W, 3)`` colour (its first 3 channels) or ``(H, W)`` grey (the first)."""
    return np.transpose(image[:3], (1, 2, 0)) if image.shape[0] >= 3 else image[0]
