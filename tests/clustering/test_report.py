"""Mass shares, group tables, orderings and figures."""

import numpy as np
import pytest
import scipy.sparse as sp
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from clustering import (
    ConfusableGroups,
    confusion_mass_share,
    covariance_heatmap,
    group_size_histogram,
    group_table,
    planted_covariance,
    reorder_by_groups,
)

# Off-diagonal |C_ij| (each unordered pair counted twice): 2*(2 + 1 + 0 + 0 + 0.5 + 1) = 9.
COV4 = np.array(
    [
        [4.0, 2.0, -1.0, 0.0],
        [2.0, 3.0, 0.0, 0.5],
        [-1.0, 0.0, 2.0, 1.0],
        [0.0, 0.5, 1.0, 5.0],
    ]
)


def test_mass_share_hand_computed() -> None:
    shares = confusion_mass_share(COV4, [[0, 1], [2, 3], [0, 2, 3], [1]])
    np.testing.assert_allclose(shares, [4 / 9, 2 / 9, 4 / 9, 0.0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(
        confusion_mass_share(sp.csr_matrix(COV4), [[0, 1]]), [4 / 9], atol=1e-15
    )
    assert confusion_mass_share(np.diag([1.0, 2.0, 3.0]), [[0, 1]]).tolist() == [0.0]


def test_mass_share_in_unit_interval_and_concentrated_in_planted_groups(easy_planted) -> None:
    cov, truth = easy_planted
    planted = [np.flatnonzero(truth == g) for g in range(6)]
    shares = confusion_mass_share(cov, planted)
    assert shares.shape == (6,) and ((shares >= 0) & (shares <= 1)).all()
    assert shares.sum() <= 1.0
    rng = np.random.default_rng(0)
    random_groups = np.array_split(rng.permutation(120), 6)
    assert shares.sum() > 2 * confusion_mass_share(cov, random_groups).sum()


def test_group_table_rows() -> None:
    names = ["cat", "dog", "car", "bus"]
    rows = group_table(COV4, [np.array([0, 1]), np.array([2, 3])], names)
    assert rows == [
        {
            "group_id": 0,
            "size": 2,
            "class_indices": [0, 1],
            "classes": ["cat", "dog"],
            "mass_share": 4 / 9,
        },
        {
            "group_id": 1,
            "size": 2,
            "class_indices": [2, 3],
            "classes": ["car", "bus"],
            "mass_share": 2 / 9,
        },
    ]
    assert group_table(COV4, [[3]])[0]["classes"] == ["3"]
    with pytest.raises(ValueError, match="one name per class"):
        group_table(COV4, [[0, 1]], ["a", "b"])


def test_reorder_by_groups() -> None:
    perm = reorder_by_groups([np.array([3, 1]), np.array([0, 1])], 6)
    assert perm.tolist() == [1, 3, 0, 2, 4, 5]
    assert reorder_by_groups([], 3).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="outside"):
        reorder_by_groups([[0, 7]], 5)


def test_heatmap_and_histogram_return_figures(easy_planted) -> None:
    cov, _ = easy_planted
    est = ConfusableGroups(n_groups=6, method="kmeans").fit(cov)
    names = [f"class{c}" for c in range(120)]
    fig = covariance_heatmap(cov, est.groups_, names)
    assert isinstance(fig, Figure)
    boxes = [p for p in fig.axes[0].patches if isinstance(p, Rectangle)]
    assert len(boxes) == 6 and sorted(int(b.get_width()) for b in boxes) == [20] * 6
    shown = fig.axes[0].images[0].get_array()
    assert shown.shape == (120, 120)
    fig.canvas.draw()  # renders on the Agg canvas
    hist = group_size_histogram(est.groups_)
    assert isinstance(hist, Figure)
    assert sum(p.get_height() for p in hist.axes[0].patches) == 6
    with pytest.raises(ValueError, match="groups is empty"):
        group_size_histogram([])


def test_heatmap_truncates_large_sparse_input() -> None:
    cov, truth = planted_covariance(1_000, 20, seed=1)
    groups = [np.flatnonzero(truth == g) for g in range(20)]
    fig = covariance_heatmap(sp.csr_matrix(cov), groups, max_classes=200)
    ax = fig.axes[0]
    assert ax.images[0].get_array().shape == (200, 200)
    assert ax.get_title() == "first 200 of 1000 classes (4 of 20 groups shown)"


def test_heatmap_labels_small_matrices() -> None:
    names = ["cat", "dog", "car", "bus"]
    fig = covariance_heatmap(COV4, [[2, 3]], names)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["car", "bus", "cat", "dog"]
