"""Hinton KD loss: hand-computed values, limits, teacher-probability path, T^2 scaling."""

import math

import pytest
import torch
import torch.nn.functional as F

from distill import KDLoss, kd_loss, kd_loss_terms, soft_target_loss

# 2 x 3 case.  With T = 2 (values from exp/log by hand, see _reference below):
#   row 0: p_s = softmax([.5, 1, 1.5]) = [.18632, .30720, .50648]
#          p_t = softmax([1.5, 1, .5]) = [.50648, .30720, .18632], KL = .32016
#   row 1: p_s = [1/3, 1/3, 1/3], p_t = softmax([.5, 0, 0]) = [.45186, .27407, .27407],
#          KL = .03017
#   KL batch mean = .17516, T^2 * KL = .70065
#   CE: -log softmax([1,2,3])[2] = .40761, -log(1/3) = 1.09861, mean .75311
#   alpha = .5: .5 * .70065 + .5 * .75311 = .72688
STUDENT = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]
TEACHER = [[3.0, 2.0, 1.0], [1.0, 0.0, 0.0]]
LABELS = [2, 0]


def _reference(zs, zt, y, temperature, alpha):
    """Independent pure-Python formula."""

    def softmax(z, t):
        e = [math.exp(v / t) for v in z]
        return [v / sum(e) for v in e]

    kl = ce = 0.0
    for a, b, label in zip(zs, zt, y, strict=True):
        ps, pt = softmax(a, temperature), softmax(b, temperature)
        kl += sum(p * math.log(p / q) for p, q in zip(pt, ps, strict=True))
        ce -= math.log(softmax(a, 1.0)[label])
    n = len(zs)
    return alpha * temperature**2 * kl / n + (1 - alpha) * ce / n


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_hand_computed_value():
    loss = kd_loss(_t(STUDENT), torch.tensor(LABELS), _t(TEACHER), temperature=2.0, alpha=0.5)
    assert loss.item() == pytest.approx(0.7268781, abs=1e-6)
    assert loss.item() == pytest.approx(_reference(STUDENT, TEACHER, LABELS, 2.0, 0.5), rel=1e-12)
    soft = soft_target_loss(_t(STUDENT), _t(TEACHER), temperature=2.0)
    assert soft.item() == pytest.approx(0.7006471, abs=1e-6)
    total, terms = kd_loss_terms(_t(STUDENT), torch.tensor(LABELS), _t(TEACHER), temperature=2.0, alpha=0.5)
    assert list(terms) == ["ce", "soft"] and total.item() == loss.item()
    assert terms["soft"].item() == pytest.approx(0.7006471, abs=1e-6)
    assert terms["ce"].item() == pytest.approx(0.7531100, abs=1e-6)


def test_terms_at_the_ends_of_alpha():
    zs, zt, y = _t(STUDENT), _t(TEACHER), torch.tensor(LABELS)
    total, terms = kd_loss_terms(zs, y, zt, temperature=2.0, alpha=1.0)
    assert total.item() == terms["soft"].item()  # ce is reported but does not count
    assert terms["ce"].item() == pytest.approx(0.7531100, abs=1e-6)
    total, terms = kd_loss_terms(zs, None, zt, temperature=2.0, alpha=1.0)
    assert list(terms) == ["soft"]
    total, terms = kd_loss_terms(zs, y, temperature=2.0, alpha=0.0)  # no teacher needed
    assert list(terms) == ["ce"] and total.item() == terms["ce"].item()


def test_random_case_matches_reference():
    g = torch.Generator().manual_seed(3)
    zs, zt = (
        torch.randn(5, 7, generator=g, dtype=torch.float64) * 2,
        torch.randn(5, 7, generator=g, dtype=torch.float64),
    )
    y = torch.randint(0, 7, (5,), generator=g)
    got = KDLoss(temperature=3.0, alpha=0.7)(zs, y, teacher_logits=zt)
    want = _reference(zs.tolist(), zt.tolist(), y.tolist(), 3.0, 0.7)
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_alpha_zero_is_cross_entropy():
    zs, y = _t(STUDENT), torch.tensor(LABELS)
    loss = kd_loss(zs, y, _t(TEACHER), temperature=4.0, alpha=0.0)
    assert loss.item() == pytest.approx(F.cross_entropy(zs, y).item(), rel=1e-12)
    assert loss.item() == pytest.approx((0.4076059644 + math.log(3)) / 2, abs=1e-9)


def test_teacher_equal_student_has_zero_kl():
    zs = _t(STUDENT)
    assert kd_loss(zs, None, zs.clone(), temperature=3.0, alpha=1.0).item() == pytest.approx(
        0.0, abs=1e-12
    )
    # alpha = 0.5: only the CE half remains.
    y = torch.tensor(LABELS)
    half_ce = 0.5 * F.cross_entropy(zs, y).item()
    assert kd_loss(zs, y, zs.clone(), temperature=3.0, alpha=0.5).item() == pytest.approx(
        half_ce, rel=1e-12
    )


def test_teacher_probs_path_equals_logits_path():
    zs, zt, y = _t(STUDENT), _t(TEACHER), torch.tensor(LABELS)
    for temperature in (1.0, 2.0, 7.5):
        a = kd_loss(zs, y, teacher_logits=zt, temperature=temperature, alpha=0.6)
        b = kd_loss(zs, y, teacher_probs=zt.softmax(-1), temperature=temperature, alpha=0.6)
        assert a.item() == pytest.approx(b.item(), rel=1e-10)


def test_teacher_probs_with_zeros_is_finite():
    zs = _t(STUDENT).requires_grad_()
    q = _t([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])
    loss = kd_loss(zs, None, teacher_probs=q, temperature=1.0, alpha=1.0)
    # row 0: sum .5 * log(.5 / p_s) with p_s = softmax([1,2,3]); row 1: log(1 / (1/3))
    ps0 = torch.softmax(_t([1.0, 2.0, 3.0]), 0)
    want = (
        0.5 * math.log(0.5 / ps0[1].item()) + 0.5 * math.log(0.5 / ps0[2].item()) + math.log(3)
    ) / 2
    assert loss.item() == pytest.approx(want, rel=1e-10)
    loss.backward()
    assert torch.isfinite(zs.grad).all()


def test_teacher_gets_no_gradient():
    zs = _t(STUDENT).requires_grad_()
    zt = _t(TEACHER).requires_grad_()
    kd_loss(zs, None, zt, temperature=2.0, alpha=1.0).backward()
    assert zt.grad is None and zs.grad is not None


def test_t_squared_keeps_gradient_magnitude():
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(8, 10, generator=g) * 3
    zt = torch.randn(8, 10, generator=g) * 3
    scaled, unscaled = {}, {}
    for temperature in (2.0, 5.0, 10.0, 20.0):
        s = zs.clone().requires_grad_()
        kd_loss(s, None, zt, temperature=temperature, alpha=1.0).backward()
        scaled[temperature] = s.grad.norm().item()
        s = zs.clone().requires_grad_()  # plain KL without T^2, written independently
        F.kl_div(
            (s / temperature).log_softmax(1), (zt / temperature).softmax(1), reduction="batchmean"
        ).backward()
        unscaled[temperature] = s.grad.norm().item()
    # measured: scaled ~ .466, .478, .462, .455
    assert max(scaled.values()) / min(scaled.values()) < 1.2
    for temperature in scaled:
        assert unscaled[temperature] * temperature**2 == pytest.approx(
            scaled[temperature], rel=1e-5
        )
    # without T^2 the gradient falls like 1/T^2: 100x from T=2 to T=20, ~4x per doubling
    assert 80 < unscaled[2.0] / unscaled[20.0] < 120
    assert 3.5 < unscaled[10.0] / unscaled[20.0] < 4.5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": 2.0, "alpha": 1.5}, "alpha must lie in"),
        ({"temperature": 2.0, "alpha": -0.1}, "alpha must lie in"),
        ({"temperature": 0.0, "alpha": 0.5}, "temperature must be"),
        ({"temperature": -1.0, "alpha": 0.5}, "temperature must be"),
        ({"temperature": float("nan"), "alpha": 0.5}, "temperature must be"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kd_loss(_t(STUDENT), torch.tensor(LABELS), _t(TEACHER), **kwargs)
    with pytest.raises(ValueError, match=match):
        KDLoss(**kwargs)


def test_bad_inputs():
    zs, zt, y = _t(STUDENT), _t(TEACHER), torch.tensor(LABELS)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        kd_loss(zs, y, torch.zeros(2, 4, dtype=torch.float64), temperature=2.0, alpha=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        kd_loss(zs, y, zt, teacher_probs=zt.softmax(-1), temperature=2.0, alpha=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        kd_loss(zs, y, temperature=2.0, alpha=0.5)
    with pytest.raises(ValueError, match="teacher_logits="):
        kd_loss(zs, y, teacher_probs=zt, temperature=2.0, alpha=0.5)  # logits passed as probs
    with pytest.raises(ValueError, match="labels are required"):
        kd_loss(zs, None, zt, temperature=2.0, alpha=0.5)
    with pytest.raises(ValueError, match="labels must be integer"):
        kd_loss(zs, torch.tensor([2.0, 0.0]), zt, temperature=2.0, alpha=0.5)
    with pytest.raises(ValueError, match="reshape"):
        kd_loss(zs.unsqueeze(0), y, zt, temperature=2.0, alpha=0.5)
