"""The fixed-point solver (specialists/ensemble/fixed_point.py) on random problems: monotone, exact (vs the gradient-descent
reference), layout- and dtype-independent."""

from __future__ import annotations

import pytest
import torch

from specialists.ensemble import (
    GroupMembership,
    active_specialists,
    combine_objective,
    solve_fixed_point,
    solve_reference,
)

f64 = torch.float64


def random_problem(batch: int, num_classes: int, groups: list[list[int]], *, top_n: int, seed: int, noise: float = 0.8):
    """Peaky generalist; specialists agree with it up to logit noise. Returns the routed problem."""
    gen = torch.Generator().manual_seed(seed)
    membership = GroupMembership.from_groups(groups, num_classes)
    logits = 1.5 * torch.randn(batch, num_classes, generator=gen, dtype=f64)
    logits[torch.arange(batch), torch.randint(num_classes, (batch,), generator=gen)] += 4.0
    p_general = logits.softmax(dim=1)
    active = active_specialists(p_general, membership, top_n)
    outputs = []
    for m, group in enumerate(membership.groups):
        index = active[:, m].nonzero().squeeze(1)
        rows, cls = logits[index], torch.tensor(group)
        outside = torch.ones(num_classes, dtype=torch.bool)
        outside[cls] = False
        head = torch.cat([rows[:, cls], rows[:, outside].logsumexp(dim=1, keepdim=True)], dim=1)
        head += noise * torch.randn(head.shape, generator=gen, dtype=f64)
        outputs.append((index, head.softmax(dim=1)))
    return p_general, outputs, active, membership


def overlapping_groups(num_classes: int, num_groups: int, size: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randperm(num_classes, generator=gen)[:size].tolist() for _ in range(num_groups)]


OVERLAPPING = [[0, 1, 2, 3, 4, 5], [4, 5, 6, 7, 8], [7, 8, 9, 10, 11, 12, 0], [12, 13, 14, 2], [15, 16, 3, 9]]


def test_problem_has_overlaps_and_several_active_specialists():
    p_general, _, active, membership = random_problem(64, 20, OVERLAPPING, top_n=2, seed=0)
    counts = active.sum(dim=1)
    assert int(counts.max()) >= 3 and float((counts >= 2).double().mean()) > 0.3
    assert int(membership.dense(dtype=torch.long).sum(dim=0).max()) == 2  # a class in two groups


@pytest.mark.parametrize("accelerate", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_objective_never_increases(accelerate, seed):
    groups = OVERLAPPING if seed == 0 else overlapping_groups(50, 8, 10, seed)
    p_general, outputs, active, membership = random_problem(96, 20 if seed == 0 else 50, groups, top_n=1 + seed, seed=seed)
    q, info = solve_fixed_point(p_general, outputs, active, membership, accelerate=accelerate, record_objective=True)
    history = info["objective_history"]  # (iterations + 1, B)
    assert info["converged"] and history.shape == (info["iterations"] + 1, 96)
    assert info["iterations"] >= (3 if accelerate else 10)  # the problems are not trivial
    steps = history[1:] - history[:-1]
    assert float(steps.max()) <= 1e-13 * float(history.abs().max())
    assert float(history[0].sum() - history[-1].sum()) > 1e-3  # and F did go down
    torch.testing.assert_close(history[-1], combine_objective(q, p_general, outputs, active, membership), atol=1e-13, rtol=0)


def test_matches_the_gradient_descent_reference():
    p_general, outputs, active, membership = random_problem(10, 20, OVERLAPPING, top_n=2, seed=4)
    q, info = solve_fixed_point(p_general, outputs, active, membership)
    assert info["converged"] and info["max_change"] <= 1e-12
    q_ref = solve_reference(p_general, outputs, active, membership, tol=1e-12)
    f = combine_objective(q, p_general, outputs, active, membership)
    f_ref = combine_objective(q_ref, p_general, outputs, active, membership)
    assert float(f.min()) > 1e-3  # a meaningful comparison: specialists disagree
    assert float(((f - f_ref).abs() / f_ref).max()) <= 1e-9
    assert float((f - f_ref).max()) <= 1e-14  # the fixed point is never worse than gradient descent
    torch.testing.assert_close(q, q_ref, atol=1e-8, rtol=0)


def test_optimality_conditions_hold():
    # KKT: q_j = b_j / (1 + a - t_j) with t_j = sum_{m active, j not in S_m} d_m / Q_m.
    p_general, outputs, active, membership = random_problem(32, 40, overlapping_groups(40, 6, 9, 7), top_n=2, seed=7)
    q, _ = solve_fixed_point(p_general, outputs, active, membership)
    b, t = p_general.clone(), torch.zeros_like(p_general)
    outside = 1 - membership.dense(dtype=f64)
    for m, (index, probs) in enumerate(outputs):
        cls = list(membership.groups[m])
        b[index.unsqueeze(1), torch.tensor(cls)] += probs[:, :-1]
        t[index] += (probs[:, -1] / (q[index] @ outside[m])).unsqueeze(1) * outside[m]
    a = active.sum(dim=1, keepdim=True).to(f64)
    torch.testing.assert_close(q, b / (1 + a - t), atol=1e-11, rtol=0)


def test_sparse_and_dense_layouts_agree():
    p_general, outputs, active, membership = random_problem(128, 60, overlapping_groups(60, 10, 14, 5), top_n=2, seed=5)
    q_sparse, info_sparse = solve_fixed_point(p_general, outputs, active, membership, sparse=True)
    q_dense, info_dense = solve_fixed_point(p_general, outputs, active, membership, sparse=False)
    assert info_sparse["sparse"] and not info_dense["sparse"]
    torch.testing.assert_close(q_sparse, q_dense, atol=1e-11, rtol=0)
    torch.testing.assert_close(q_sparse.sum(dim=1), torch.ones(128, dtype=f64), atol=1e-14, rtol=0)


def test_plain_and_accelerated_agree_and_squarem_needs_fewer_iterations():
    p_general, outputs, active, membership = random_problem(128, 60, overlapping_groups(60, 10, 14, 6), top_n=3, seed=6)
    q_fast, info_fast = solve_fixed_point(p_general, outputs, active, membership)
    q_plain, info_plain = solve_fixed_point(p_general, outputs, active, membership, accelerate=False, max_iter=5000)
    torch.testing.assert_close(q_fast, q_plain, atol=1e-10, rtol=0)
    assert info_plain["converged"] and 3 * 3 * info_fast["iterations"] < info_plain["iterations"]


def test_float32_matches_float64():
    p_general, outputs, active, membership = random_problem(64, 40, overlapping_groups(40, 6, 9, 8), top_n=2, seed=8)
    p32, out32 = p_general.float(), [(index, probs.float()) for index, probs in outputs]
    q64, _ = solve_fixed_point(p32, out32, active, membership)
    for sparse in (True, False):
        q32, info = solve_fixed_point(p32, out32, active, membership, dtype=torch.float32, sparse=sparse)
        assert q32.dtype == torch.float32 and info["converged"] and info["tol"] == pytest.approx(4 * 2**-23)
        torch.testing.assert_close(q32.double(), q64, atol=2e-6, rtol=0)
        f32 = combine_objective(q32, p32, out32, active, membership)
        f64_ = combine_objective(q64, p32, out32, active, membership)
        assert float(((f32 - f64_) / f64_.clamp_min(1e-3)).abs().max()) < 1e-5


def test_tolerance_and_iteration_cap_are_reported():
    p_general, outputs, active, membership = random_problem(64, 20, OVERLAPPING, top_n=2, seed=9)
    _, loose = solve_fixed_point(p_general, outputs, active, membership, tol=1e-4)
    _, tight = solve_fixed_point(p_general, outputs, active, membership, tol=1e-13)
    assert loose["converged"] and loose["max_change"] <= 1e-4 and tight["max_change"] <= 1e-13
    assert loose["iterations"] < tight["iterations"]
    _, capped = solve_fixed_point(p_general, outputs, active, membership, accelerate=False, max_iter=2)
    assert capped["iterations"] == 2 and not capped["converged"] and capped["max_change"] > 1e-12
