"""DKD and DIST against hand-computed values and against the reference implementations' formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distill import create_loss, dist_loss, dkd_loss, dkd_parts, soft_target_loss


def test_dkd_hand_computed():
    # student uniform over 3 classes, teacher (0.5, 0.3, 0.2), true class 0, T = 1
    zs = torch.zeros(1, 3)
    q = torch.tensor([[0.5, 0.3, 0.2]])
    y = torch.tensor([0])
    tckd, nckd = dkd_parts(zs, y, teacher_probs=q, temperature=1.0)
    # binary: teacher (0.5, 0.5) vs student (1/3, 2/3); the rest: teacher (0.6, 0.4) vs student (0.5, 0.5)
    assert tckd.item() == pytest.approx(0.5 * math.log(1.5) + 0.5 * math.log(0.75), abs=1e-6)
    assert nckd.item() == pytest.approx(0.6 * math.log(1.2) + 0.4 * math.log(0.8), abs=1e-6)
    total = dkd_loss(zs, y, teacher_logits=q.log(), alpha=2.0, beta=3.0, temperature=1.0)
    assert total.item() == pytest.approx(2.0 * tckd.item() + 3.0 * nckd.item(), abs=1e-6)


def test_dkd_recombines_into_kd_and_scales_like_it():
    """The paper's identity KL(p_t || p_s) = TCKD + (1 - p_t,g) * NCKD, at any T (both sides T^2)."""
    torch.manual_seed(0)
    zs, zt, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    for temperature in (1.0, 3.0):
        p_t = F.softmax(zt / temperature, dim=1)
        per_row_kd = (p_t * (p_t.log() - F.log_softmax(zs / temperature, dim=1))).sum(1) * temperature**2
        parts = [dkd_parts(zs[i:i + 1], y[i:i + 1], zt[i:i + 1], temperature=temperature) for i in range(6)]
        recombined = torch.stack([t + (1 - p_t[i, y[i]]) * n for i, (t, n) in enumerate(parts)])
        torch.testing.assert_close(recombined, per_row_kd, atol=1e-5, rtol=1e-5)
    kd = soft_target_loss(zs, zt, temperature=3.0)
    torch.testing.assert_close(per_row_kd.mean(), kd, atol=1e-5, rtol=1e-5)


def _mdistiller_dkd(logits_s, logits_t, target, alpha, beta, temperature):
    """The formula of mdistiller/distillers/DKD.py (megvii-research/mdistiller), written here
    from its equations: masks of the true class, the binary [p_g, sum of the rest] distributions
    with KL summed and divided by B, and the non-target distribution taken as the softmax of
    z / T - 1000 * gt_mask."""
    gt = torch.zeros_like(logits_s).scatter_(1, target[:, None], 1.0)
    p_s, p_t = F.softmax(logits_s / temperature, 1), F.softmax(logits_t / temperature, 1)
    b_s = torch.stack([(p_s * gt).sum(1), (p_s * (1 - gt)).sum(1)], 1)
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * (1 - gt)).sum(1)], 1)
    tckd = (b_t * (b_t.log() - b_s.log())).sum() * temperature**2 / target.shape[0]
    r_t = F.softmax(logits_t / temperature - 1000.0 * gt, 1)
    log_r_s = F.log_softmax(logits_s / temperature - 1000.0 * gt, 1)
    nckd = (torch.special.xlogy(r_t, r_t) - r_t * log_r_s).sum() * temperature**2 / target.shape[0]
    return alpha * tckd + beta * nckd


def test_dkd_equals_the_mdistiller_formula():
    torch.manual_seed(1)
    zs, zt, y = torch.randn(8, 10), 2 * torch.randn(8, 10), torch.randint(0, 10, (8,))
    ours = create_loss("dkd", alpha=1.0, beta=8.0, temperature=4.0)(zs, y, teacher_logits=zt)
    torch.testing.assert_close(ours, _mdistiller_dkd(zs, zt, y, 1.0, 8.0, 4.0), atol=1e-5, rtol=1e-5)
    # the ensemble's probabilities give the same value as its logits log q
    q = F.softmax(zt, dim=1)
    torch.testing.assert_close(dkd_loss(zs, y, teacher_probs=q), dkd_loss(zs, y, teacher_logits=q.log()))


def test_dkd_with_zero_teacher_probabilities_has_finite_gradients():
    q = torch.tensor([[0.7, 0.3, 0.0, 0.0]])
    zs = torch.randn(1, 4, requires_grad=True)
    loss = dkd_loss(zs, torch.tensor([2]), teacher_probs=q, temperature=2.0)  # true class has mass 0
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zs.grad).all()


def test_dist_hand_computed():
    y_t = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    y_s = torch.tensor([[0.2, 0.3, 0.5], [0.5, 0.3, 0.2]])  # each row reversed
    # rows: centred (5, -1, -4)/30 vs (-4, -1, 5)/30 -> rho = -39/42; columns: -1, 0 (constant), -1
    inter, intra = 1 + 39 / 42, 1 + 2 / 3
    value = dist_loss(y_s.log(), teacher_probs=y_t, beta=1.0, gamma=1.0, temperature=1.0)
    assert value.item() == pytest.approx(inter + intra, abs=1e-5)
    scaled = dist_loss(y_s.log() * 2, teacher_logits=y_t.log() * 2, beta=2.0, gamma=0.5, temperature=2.0)
    assert scaled.item() == pytest.approx(4 * (2 * inter + 0.5 * intra), abs=1e-4)


def _torchdistill_dist(zs, zt, beta, gamma, tau, eps=1e-8):
    """torchdistill/losses/mid_level.py DISTLoss (yoshitomo-matsubara/torchdistill), written from its
    equations: y = softmax(z / tau); inter = 1 - mean over rows of the cosine similarity of the
    row-centred predictions; intra = the same on the transposes; tau^2 * (beta * inter + gamma * intra)."""
    def corr(a, b):
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1).clamp_min(eps) * b.norm(dim=1).clamp_min(eps))
    y_s, y_t = F.softmax(zs / tau, 1), F.softmax(zt / tau, 1)
    return tau**2 * (beta * (1 - corr(y_s, y_t).mean()) + gamma * (1 - corr(y_s.t(), y_t.t()).mean()))


def test_dist_equals_the_torchdistill_formula():
    torch.manual_seed(2)
    zs, zt = torch.randn(16, 7), torch.randn(16, 7)
    ours = create_loss("dist", beta=2.0, gamma=2.0, temperature=4.0)(zs, None, teacher_logits=zt)
    torch.testing.assert_close(ours, _torchdistill_dist(zs, zt, 2.0, 2.0, 4.0), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="at least 2 examples"):
        dist_loss(zs[:1], teacher_logits=zt[:1])


def test_bad_arguments():
    with pytest.raises(ValueError, match="dkd: beta must be >= 0"):
        create_loss("dkd", beta=-1.0)
    with pytest.raises(ValueError, match="same B and K"):
        dkd_loss(torch.zeros(2, 3), torch.tensor([0, 1]), teacher_logits=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="temperature"):
        create_loss("dist", temperature=0.0)
