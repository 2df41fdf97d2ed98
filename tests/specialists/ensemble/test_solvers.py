"""Closed-form cases, API behaviour and input validation of the eq. 5 solvers and objective
(specialists/ensemble)."""

from __future__ import annotations

import pytest
import torch

from specialists.ensemble import (
    GroupMembership,
    active_specialists,
    combine_objective,
    route,
    solve_fixed_point,
    solve_reference,
)

f64 = torch.float64


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=f64)


def idx(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long)


def all_solvers(p_general, outputs, active, membership):
    """q from every production variant and the reference."""
    out = {}
    for sparse in (True, False):
        for accelerate in (True, False):
            q, info = solve_fixed_point(p_general, outputs, active, membership, sparse=sparse, accelerate=accelerate)
            assert info["converged"] and info["sparse"] is sparse
            out[f"sparse={sparse} accelerate={accelerate}"] = q
    out["reference"] = solve_reference(p_general, outputs, active, membership)
    return out


# ---------------------------------------------------------------------------------- closed forms


def test_two_classes_one_specialist_is_the_average():
    # K = 2, group {0}: the dustbin is class 1, so q~ = q and F = KL(pg||q) + KL(pm||q),
    # minimised by q = (pg + pm) / 2.
    membership = GroupMembership.from_groups([[0]], 2)
    p_general = t([[0.7, 0.3], [0.9, 0.1]])
    outputs = [(idx([0, 1]), t([[0.2, 0.8], [0.6, 0.4]]))]
    active = torch.ones(2, 1, dtype=torch.bool)
    expected = t([[0.45, 0.55], [0.75, 0.25]])
    for name, q in all_solvers(p_general, outputs, active, membership).items():
        torch.testing.assert_close(q, expected, atol=1e-9 if name == "reference" else 1e-12, rtol=0, msg=name)


def test_single_specialist_closed_form():
    # One active specialist on S: in-group q_j = (pg_j + pm_j) / 2; outside, the KKT conditions
    # give q_j = pg_j / (2 - r) with r = d / Q, hence Q = (G_out + d) / 2 and
    # q_j = pg_j (G_out + d) / (2 G_out), G_out = sum_{j not in S} pg_j.
    group = [4, 1, 3]
    membership = GroupMembership.from_groups([group, [0, 5]], 6)
    p_general = t([[0.05, 0.30, 0.10, 0.20, 0.25, 0.10]])
    pm = t([[0.1, 0.5, 0.1, 0.3]])  # classes 4, 1, 3 then dustbin
    outputs = [(idx([0]), pm), (idx([]), torch.zeros(0, 3, dtype=f64))]
    active = torch.tensor([[True, False]])
    g_out, d = 0.05 + 0.10 + 0.10, 0.3
    expected = p_general.clone() * (g_out + d) / (2 * g_out)
    expected[0, group] = (p_general[0, group] + pm[0, :3]) / 2
    assert float(expected.sum()) == pytest.approx(1.0, abs=1e-15)
    for name, q in all_solvers(p_general, outputs, active, membership).items():
        torch.testing.assert_close(q, expected, atol=1e-9 if name == "reference" else 1e-12, rtol=0, msg=name)
    value = combine_objective(expected, p_general, outputs, active, membership)
    q_sparse, _ = solve_fixed_point(p_general, outputs, active, membership)
    assert float(combine_objective(q_sparse, p_general, outputs, active, membership)) == pytest.approx(float(value), rel=1e-12)


def test_two_specialists_covering_all_classes_average_three_distributions():
    # K = 2, groups {0} and {1}, both active: each specialist is a distribution over the two
    # classes (its dustbin is the other class), so q = (pg + s1 + s2) / 3. The union of the
    # active groups is every class, so the lumped layout has an empty lump.
    membership = GroupMembership.from_groups([[0], [1]], 2)
    p_general = t([[0.6, 0.4]])
    outputs = [(idx([0]), t([[0.9, 0.1]])), (idx([0]), t([[0.3, 0.7]]))]  # s2 = (0.7, 0.3)
    active = torch.ones(1, 2, dtype=torch.bool)
    expected = t([[(0.6 + 0.9 + 0.7) / 3, (0.4 + 0.1 + 0.3) / 3]])
    for name, q in all_solvers(p_general, outputs, active, membership).items():
        torch.testing.assert_close(q, expected, atol=1e-9 if name == "reference" else 1e-12, rtol=0, msg=name)


def test_zero_generalist_mass_outside_the_group():
    # pg = (1, 0, 0), group {0}, pm = (0.5, dust 0.5): q_0 = 0.75 and the outside mass is the
    # average 0.25; the generalist gives no shape there, so it is split evenly.
    membership = GroupMembership.from_groups([[0]], 3)
    p_general = t([[1.0, 0.0, 0.0]])
    outputs = [(idx([0]), t([[0.5, 0.5]]))]
    active = torch.ones(1, 1, dtype=torch.bool)
    for sparse in (True, False):
        q, info = solve_fixed_point(p_general, outputs, active, membership, sparse=sparse)
        assert info["converged"]
        torch.testing.assert_close(q, t([[0.75, 0.125, 0.125]]), atol=1e-12, rtol=0)


def test_no_active_specialist_returns_the_generalist_exactly():
    gen = torch.Generator().manual_seed(3)
    membership = GroupMembership.from_groups([[0, 1], [2, 3, 4]], 8)
    p_general = torch.rand(5, 8, generator=gen, dtype=f64).softmax(dim=1)
    p_general[:, :5] *= 1e-3  # keep the top class outside every group
    p_general /= p_general.sum(dim=1, keepdim=True)
    outputs = [(idx([]), torch.zeros(0, 3, dtype=f64)), (idx([]), torch.zeros(0, 4, dtype=f64))]
    active = active_specialists(p_general, membership)
    assert not bool(active.any())
    q, info = solve_fixed_point(p_general, outputs, active, membership)
    assert torch.equal(q, p_general) and q.data_ptr() != p_general.data_ptr()
    assert info["iterations"] == 0 and info["converged"]
    assert torch.equal(solve_reference(p_general, outputs, active, membership), p_general)
    assert torch.equal(combine_objective(q, p_general, outputs, active, membership), torch.zeros(5, dtype=f64))


def test_inactive_rows_stay_exact_next_to_active_rows():
    membership = GroupMembership.from_groups([[0]], 3)
    p_general = t([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    active = active_specialists(p_general, membership)
    assert active.tolist() == [[True], [False]]
    q, _ = solve_fixed_point(p_general, [(idx([0]), t([[0.7, 0.3]]))], active, membership)
    assert torch.equal(q[1], p_general[1])
    torch.testing.assert_close(q[0, 0], t(0.6), atol=1e-12, rtol=0)


def test_rows_for_inactive_examples_are_ignored():
    membership = GroupMembership.from_groups([[0], [1, 2]], 4)
    p_general = t([[0.5, 0.2, 0.2, 0.1], [0.1, 0.2, 0.6, 0.1]])
    active = active_specialists(p_general, membership)
    routed = [(idx([0]), t([[0.6, 0.4]])), (idx([1]), t([[0.1, 0.8, 0.1]]))]
    padded = [(idx([1, 0]), t([[0.01, 0.99], [0.6, 0.4]])), (idx([0, 1]), t([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1]]))]
    q_routed, _ = solve_fixed_point(p_general, routed, active, membership)
    q_padded, _ = solve_fixed_point(p_general, padded, active, membership)
    torch.testing.assert_close(q_routed, q_padded, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------ API


def test_membership_matrices_and_routing_tables():
    membership = GroupMembership.from_groups([[3, 0], [0, 1, 2]], 5)
    expected = t([[1, 0, 0, 1, 0], [1, 1, 1, 0, 0]])
    torch.testing.assert_close(membership.dense(dtype=f64), expected)
    assert membership.padded_groups().tolist() == [[3, 0, -1], [0, 1, 2]]
    assert membership.groups == ((3, 0), (0, 1, 2)) and membership.sizes == (2, 3)
    assert GroupMembership.from_groups([[3, 0], [0, 1, 2]], 5) == membership


@pytest.mark.parametrize(
    ("groups", "num_classes", "message"),
    [([[0, 5]], 5, "outside"), ([[1, 1]], 5, "repeats"), ([[]], 5, "empty"), ([[0, 1, 2]], 3, "all 3"),
     ([[-1]], 5, "outside"), ([[0]], 0, "num_classes")],
)
def test_membership_validation(groups, num_classes, message):
    with pytest.raises(ValueError, match=message):
        GroupMembership.from_groups(groups, num_classes)


def test_active_specialists_top_n():
    membership = GroupMembership.from_groups([[0, 1], [1, 2], [3]], 5)
    p_general = t([[0.5, 0.3, 0.1, 0.05, 0.05], [0.05, 0.1, 0.15, 0.6, 0.1], [0.05, 0.1, 0.05, 0.2, 0.6]])
    assert active_specialists(p_general, membership).tolist() == [
        [True, False, False], [False, False, True], [False, False, False]]
    assert active_specialists(p_general, membership, top_n=2).tolist() == [
        [True, True, False], [False, True, True], [False, False, True]]
    assert route(active_specialists(p_general, membership, top_n=2))[2].tolist() == [1, 2]


def test_combine_objective_hand_value():
    # F = KL(pg||q) + KL(pm||q~) with q~ = (q_0, q_1 + q_2).
    membership = GroupMembership.from_groups([[0]], 3)
    p_general, q = t([[0.5, 0.25, 0.25]]), t([[0.4, 0.4, 0.2]])
    pm = t([[0.6, 0.4]])
    expected = sum(p * torch.log(p / r) for p, r in [(t(0.5), t(0.4)), (t(0.25), t(0.4)), (t(0.25), t(0.2)),
                                                      (t(0.6), t(0.4)), (t(0.4), t(0.6))])
    value = combine_objective(q, p_general, [(idx([0]), pm)], torch.ones(1, 1, dtype=torch.bool), membership)
    torch.testing.assert_close(value, expected.reshape(1), atol=1e-15, rtol=0)


def test_route_gives_each_specialist_its_active_examples():
    membership = GroupMembership.from_groups([[0, 1], [1, 2, 3]], 5)
    p_general = t([[0.4, 0.3, 0.1, 0.1, 0.1], [0.1, 0.5, 0.2, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1, 0.6]])
    active = active_specialists(p_general, membership)
    first, second = route(active)  # class 1 is in both groups: row 1 activates both
    assert first.tolist() == [0, 1] and second.tolist() == [1]
    routed = [(first, t([[0.5, 0.3, 0.2]] * 2)), (second, t([[0.6, 0.1, 0.1, 0.2]]))]
    q, _ = solve_fixed_point(p_general, routed, active, membership)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(3, dtype=f64), atol=1e-14, rtol=0)
    assert torch.equal(q[2], p_general[2])  # no active specialist
    with pytest.raises(ValueError, match="2-D bool tensor"):
        route(active.long())


# ----------------------------------------------------------------------------------- validation


def _valid_problem():
    membership = GroupMembership.from_groups([[0, 1], [2]], 4)
    p_general = t([[0.5, 0.2, 0.2, 0.1], [0.1, 0.2, 0.6, 0.1]])
    outputs = [(idx([0]), t([[0.5, 0.3, 0.2]])), (idx([1]), t([[0.7, 0.3]]))]
    return p_general, outputs, active_specialists(p_general, membership), membership


def test_valid_problem_passes():
    p_general, outputs, active, membership = _valid_problem()
    assert solve_fixed_point(p_general, outputs, active, membership)[1]["converged"]


@pytest.mark.parametrize(
    ("row", "message"),
    [([0.5, 0.2, 0.2, 0.2], r"p_general rows \[1\] do not sum to 1"),
     ([0.5, float("nan"), 0.3, 0.2], r"p_general has NaN/inf in rows \[1\]"),
     ([0.5, float("inf"), 0.3, 0.2], r"p_general has NaN/inf in rows \[1\]"),
     ([0.7, -0.1, 0.2, 0.2], r"p_general has negative probabilities in rows \[1\]")],
)
def test_bad_generalist_rows_are_named(row, message):
    p_general, outputs, active, membership = _valid_problem()
    p_general[1] = t(row)
    with pytest.raises(ValueError, match=message):
        solve_fixed_point(p_general, outputs, active, membership)
    with pytest.raises(ValueError, match=message):
        active_specialists(p_general, membership)


@pytest.mark.parametrize(
    ("probs", "message"),
    [([[0.5, 0.3, 0.3]], r"specialist_probs\[0\] rows \[0\] do not sum to 1"),
     ([[0.5, float("nan"), 0.5]], r"specialist_probs\[0\] has NaN/inf in rows \[0\]"),
     ([[1.2, -0.2, 0.0]], r"specialist_probs\[0\] has negative probabilities in rows \[0\]"),
     ([[0.5, 0.5]], r"specialist_probs\[0\] probs must have shape \(1, 3\)")],
)
def test_bad_specialist_rows_are_named(probs, message):
    p_general, outputs, active, membership = _valid_problem()
    outputs[0] = (idx([0]), t(probs))
    for solve in (solve_fixed_point, solve_reference, combine_objective):
        args = (p_general, outputs, active, membership)
        args = (p_general, *args) if solve is combine_objective else args
        with pytest.raises(ValueError, match=message):
            solve(*args)


def test_structural_errors():
    p_general, outputs, active, membership = _valid_problem()
    with pytest.raises(ValueError, match="membership.num_classes is 4"):
        solve_fixed_point(p_general[:, :3] / p_general[:, :3].sum(1, keepdim=True), outputs, active[:, :2], membership)
    with pytest.raises(ValueError, match="num_classes"):
        active_specialists(p_general, GroupMembership.from_groups([[0]], 5))
    with pytest.raises(ValueError, match="active must be a bool tensor of shape"):
        solve_fixed_point(p_general, outputs, active[:, :1], membership)
    with pytest.raises(ValueError, match="active must be a bool tensor"):
        solve_fixed_point(p_general, outputs, active.double(), membership)
    with pytest.raises(ValueError, match="2 groups"):
        solve_fixed_point(p_general, outputs[:1], active, membership)
    with pytest.raises(ValueError, match=r"specialist 1 is active for examples \[1\]"):
        solve_fixed_point(p_general, [outputs[0], (idx([0]), t([[0.7, 0.3]]))], active, membership)
    with pytest.raises(ValueError, match="repeats example ids"):
        solve_fixed_point(p_general, [(idx([0, 0]), t([[0.5, 0.3, 0.2]] * 2)), outputs[1]], active, membership)
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        solve_fixed_point(p_general, [(idx([2]), t([[0.5, 0.3, 0.2]])), outputs[1]], active, membership)
    with pytest.raises(ValueError, match="dtype"):
        solve_fixed_point(p_general, outputs, active, membership, dtype=torch.float16)


@pytest.mark.parametrize("top_n", [0, 5, -1])
def test_top_n_out_of_range(top_n):
    p_general, _, _, membership = _valid_problem()
    with pytest.raises(ValueError, match=r"top_n must be an int in \[1, 4\]"):
        active_specialists(p_general, membership, top_n=top_n)
