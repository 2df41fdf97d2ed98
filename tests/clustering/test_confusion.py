"""Confusion affinities, grouping quality against chance, and the held-out group selection."""

import numpy as np
import pytest

from clustering.affinity_groups import AffinityGroups, candidate_group_counts
from clustering.confusion import (
    ConfusionAccumulator,
    affinity_from,
    captured_share,
    group_shares,
    grouping_quality,
    normalised_affinity,
    random_share,
)


def test_accumulator_sums_probabilities_per_true_class():
    acc = ConfusionAccumulator(3)
    acc.update(np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]]), np.array([0, 0]))
    acc.update(np.array([[0.0, 0.5, 0.5]]), np.array([2]))
    m = acc.confusion()
    assert np.allclose(m, [[0.8, 1.0, 0.2], [0, 0, 0], [0.0, 0.5, 0.5]]) and acc.count == 3
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        acc.update(np.array([[1.0, 0, 0]]), np.array([3]))


def test_captured_share_by_hand():
    m = np.array([[5.0, 2.0, 1.0], [3.0, 6.0, 0.0], [0.0, 4.0, 7.0]])  # off-diagonal mass 10
    assert captured_share(m, [[0, 1]]) == pytest.approx(5 / 10)       # 2 + 3
    assert captured_share(m, [[1, 2]]) == pytest.approx(4 / 10)       # 0 + 4
    assert captured_share(m, [[0, 1, 2]]) == pytest.approx(1.0)
    assert np.isnan(captured_share(np.eye(3), [[0, 1]]))


def test_group_shares_are_each_groups_captured_share():
    m = np.array([[5.0, 2.0, 1.0], [3.0, 6.0, 0.0], [0.0, 4.0, 7.0]])
    groups = [[0, 1], [1, 2], [0, 1, 2], [2]]
    assert group_shares(m, groups).tolist() == pytest.approx([captured_share(m, [g]) for g in groups])
    assert group_shares(m, groups).tolist() == pytest.approx([0.5, 0.4, 1.0, 0.0])
    assert np.isnan(group_shares(np.eye(3), [[0, 1], [2]])).all()


def test_random_share_of_a_partition_is_its_pair_fraction_on_uniform_confusion():
    k = 12
    m = np.ones((k, k))
    groups = [list(range(0, 6)), list(range(6, 12))]
    # uniform off-diagonal mass: the share inside is (pairs inside) / (all ordered pairs)
    expected = 2 * 6 * 5 / (k * (k - 1))
    assert random_share(m, groups) == pytest.approx(expected)
    assert grouping_quality(m, groups)["ratio_to_random"] == pytest.approx(1.0)


def test_affinities_are_symmetric_zero_diagonal_and_degree_normalised():
    m = np.array([[4.0, 1.0, 0.0], [3.0, 2.0, 1.0], [0.0, 1.0, 5.0]])
    a = normalised_affinity(m)
    sym = np.array([[0, 4.0, 0], [4.0, 0, 2.0], [0, 2.0, 0]])
    d = np.sqrt(sym.sum(1))
    assert np.allclose(a, sym / np.outer(d, d)) and np.allclose(a, a.T)
    cov = np.array([[0.2, -0.1], [-0.1, 0.2]])
    assert np.allclose(affinity_from("offdiag", cov=cov), 0)          # negative covariance clipped
    with pytest.raises(ValueError, match="needs the holdout confusion"):
        affinity_from("confusion", cov=cov)


def _planted_confusion(rng, supers=4, per=5, within=0.2, noise=0.005, n=20):
    """Holdout soft confusion of a generalist that confuses classes inside planted super-classes."""
    k = supers * per
    m = np.zeros((k, k))
    for c in range(k):
        s = c // per
        p = np.full(k, noise)
        p[s * per:(s + 1) * per] += within * rng.uniform(0.5, 1.5, per)
        p[c] = 0
        p = p / p.sum() * 0.3
        p[c] = 0.7
        m[c] = n * p
    return m


def test_the_planted_super_classes_are_found_with_their_number():
    rng = np.random.default_rng(0)
    a, b = _planted_confusion(rng), _planted_confusion(rng)
    est = AffinityGroups(random_state=0).fit(a, b)
    assert est.n_groups_ == 4
    assert sorted(tuple(g) for g in est.groups_) == [tuple(range(s * 5, s * 5 + 5)) for s in range(4)]
    assert grouping_quality(a + b, est.groups_)["ratio_to_random"] > 2


def test_unrelated_classes_are_not_grouped():
    """A 10-class generalist whose errors carry no structure: no group of unrelated classes."""
    rng = np.random.default_rng(1)
    def noise():
        m = rng.uniform(0.0, 1.0, (10, 10))
        np.fill_diagonal(m, 50.0)
        return m
    est = AffinityGroups(random_state=0).fit(noise(), noise())
    assert all(len(g) <= 3 for g in est.groups_), [list(g) for g in est.groups_]
    assert len(est.unassigned_) >= 6


def test_overlap_adds_the_classes_confused_across_the_boundary():
    m = np.zeros((6, 6))
    m[0, 1] = m[1, 0] = m[3, 4] = m[4, 3] = 10.0
    m[2, 0] = m[0, 2] = 4.0       # class 2 mostly confused with group {0, 1}
    m[2, 3] = 1.0
    np.fill_diagonal(m, 100)
    est = AffinityGroups(n_groups=3, overlap=0.5, random_state=0).fit(m / 2, m / 2)
    groups = [set(g) for g in est.groups_]
    assert any({0, 1} <= g and 2 in g for g in groups)


def test_candidate_counts():
    assert candidate_group_counts(136) == [2, 3, 4, 6, 8, 12, 18, 28, 42, 64]
    assert candidate_group_counts(3) == [1]
