"""Figures for confusable groups. Functions return ``matplotlib.figure.Figure`` objects on the
Agg canvas (no pyplot state, no files); the caller saves or logs them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from clustering._validation import NORMALIZATIONS, check_choice, check_cov, check_groups
from clustering.report import group_segments, reorder_by_groups

_MAX_TICK_LABELS = 60


def _new_figure(figsize: tuple[float, float]) -> tuple[Figure, Any]:
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def covariance_heatmap(
    cov: Any,
    groups: Sequence[Any],
    class_names: Sequence[str] | None = None,
    *,
    max_classes: int = 500,
    normalize: str | None = "correlation",
) -> Figure:
    """Heatmap of the class covariance with classes reordered by group and group boxes drawn.

    For K > ``max_classes`` only the first ``max_classes`` classes of the group ordering
    (i.e. the first groups) are shown, and the title says so; only that (<= max_classes)^2
    block is ever densified, so sparse (K, K) input of any size is fine.

    Args:
        cov: (K, K) dense or sparse class covariance.
        groups: class-index arrays (e.g. ``ConfusableGroups.groups_``).
        class_names: K names, used as tick labels when at most 60 classes are shown.
        max_classes: most classes drawn.
        normalize: "correlation" to draw C_ij / sqrt(C_ii C_jj) (readable across class
            frequencies), "l2" for C_ij / (||C_i|| ||C_j||)^(1/2), None for raw C.
    """
    mat = check_cov(cov)
    k = mat.shape[0]
    if normalize is not None:
        check_choice(normalize, "normalize", NORMALIZATIONS)
    if class_names is not None and len(class_names) != k:
        raise ValueError(
            f"class_names has {len(class_names)} entries but cov has {k} classes; pass one name per class."
        )
    grps = check_groups(groups, k)
    shown = reorder_by_groups(grps, k)[:max_classes]
    block = mat[shown][:, shown].toarray() if sp.issparse(mat) else mat[np.ix_(shown, shown)]
    block = _normalized_block(mat, block.astype(np.float64), shown, normalize)
    off = np.abs(block[~np.eye(block.shape[0], dtype=bool)])
    vmax = float(np.quantile(off, 0.99)) if off.size else 0.0
    vmax = vmax if vmax > 0 else 1.0  # colour scale from off-diagonal entries
    fig, ax = _new_figure((8.0, 7.0))
    image = ax.imshow(block, cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label=f"{normalize or 'raw'} covariance")
    n_drawn = _draw_boxes(ax, group_segments(grps, k), shown.size)
    if class_names is not None and shown.size <= _MAX_TICK_LABELS:
        names = [str(class_names[c]) for c in shown]
        ax.set_xticks(range(shown.size), names, rotation=90, fontsize=7)
        ax.set_yticks(range(shown.size), names, fontsize=7)
    title = f"class covariance by group ({len(grps)} groups, K={k})"
    if shown.size < k:
        title = f"first {shown.size} of {k} classes ({n_drawn} of {len(grps)} groups shown)"
    ax.set_title(title)
    ax.set_xlabel("class (reordered by group)")
    ax.set_ylabel("class (reordered by group)")
    return fig


def _normalized_block(
    mat: np.ndarray | sp.csr_matrix, block: np.ndarray, shown: np.ndarray, normalize: str | None
) -> np.ndarray:
    if normalize is None:
        return block
    if normalize == "correlation":
        diag = mat.diagonal() if sp.issparse(mat) else np.diag(mat)
        scale = np.sqrt(np.clip(diag[shown].astype(np.float64), 0.0, None))
    else:
        cols = mat[:, shown]
        sq = (
            cols.multiply(cols).sum(axis=0)
            if sp.issparse(mat)
            else np.einsum("ij,ij->j", cols, cols)
        )
        scale = np.sqrt(np.sqrt(np.asarray(sq, dtype=np.float64).ravel()))
    scale[scale == 0] = 1.0
    return block / scale[:, None] / scale[None, :]


def _draw_boxes(ax: Any, segments: list[tuple[int, int]], n_shown: int) -> int:
    drawn = 0
    for start, stop in segments:
        if start >= n_shown or stop == start:
            continue
        end = min(stop, n_shown)
        ax.add_patch(
            Rectangle(
                (start - 0.5, start - 0.5),
                end - start,
                end - start,
                fill=False,
                edgecolor="black",
                linewidth=0.8,
            )
        )
        drawn += 1
    return drawn


def group_size_histogram(groups: Sequence[Any]) -> Figure:
    """Histogram of group sizes (number of classes per group)."""
    sizes = np.array([np.asarray(g).size for g in groups], dtype=np.int64)
    if sizes.size == 0:
        raise ValueError(
            "groups is empty; fit ConfusableGroups first (or lower min_group_size if all groups were dropped)."
        )
    fig, ax = _new_figure((6.0, 4.0))
    bins = np.arange(sizes.min(), sizes.max() + 2) - 0.5 if sizes.max() - sizes.min() < 50 else 30
    ax.hist(sizes, bins=bins, color="tab:blue", edgecolor="white")
    ax.set_xlabel("classes per group")
    ax.set_ylabel("number of groups")
    ax.set_title(
        f"{sizes.size} groups: size min {sizes.min()}, median {int(np.median(sizes))}, max {sizes.max()}"
    )
    return fig
