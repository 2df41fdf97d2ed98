"""Hint, attention transfer, RKD and similarity-preserving losses on tiny tensors."""

import math

import numpy as np
import pytest
import torch

from distill import (
    AttentionTransferLoss,
    HintLoss,
    RKDLoss,
    SimilarityPreservingLoss,
    attention_loss,
    attention_map,
    hint_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    similarity_preserving_loss,
)


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


# ------------------------------------------------------------------------ hint


def _hint_with_weights(weight, bias, **kwargs):
    hint = HintLoss(len(weight[0]), len(weight), **kwargs).double()
    with torch.no_grad():
        hint.regressor.weight.copy_(_t(weight).view(len(weight), -1, 1, 1))
        hint.regressor.bias.copy_(_t(bias))
    return hint


def test_hint_linear_features_hand_value():
    # regressor: [1, 2] . x + .5 ; x = [1, 1] -> 3.5 ; teacher 3 -> (.5)^2 = .25
    # second sample: x = [0, -1] -> -1.5 ; teacher 0 -> 2.25 ; mean = 1.25
    hint = _hint_with_weights([[1.0, 2.0]], [0.5])
    loss = hint(_t([[1.0, 1.0], [0.0, -1.0]]), _t([[3.0], [0.0]]))
    assert loss.item() == pytest.approx(1.25)


def test_hint_conv_features_hand_value():
    # 1x1 conv 2 -> 1 channels, weight [1, -1], bias 0: out = a - b per pixel.
    hint = _hint_with_weights([[1.0, -1.0]], [0.0])
    s = _t([[[[1.0, 2.0]], [[0.0, 1.0]]]])  # (1, 2, 1, 2): out = [1, 1]
    t = _t([[[[1.0, 3.0]]]])  # (1, 1, 1, 2): diff [0, -2] -> mse 2
    assert hint(s, t).item() == pytest.approx(2.0)
    assert hint_loss(_t([1.0, 1.0]), _t([1.0, 3.0])).item() == pytest.approx(2.0)


def test_hint_regressor_is_trained_and_teacher_detached():
    torch.manual_seed(0)
    hint = HintLoss(3, 5)
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 5, 4, 4, requires_grad=True)
    hint(s, t).backward()
    assert hint.regressor.weight.grad is not None and s.grad is not None and t.grad is None


def test_hint_spatial_mismatch_names_shapes_and_modules():
    hint = HintLoss(4, 8, student_name="student.blocks.2", teacher_name="teacher.layer3.1")
    s, t = torch.zeros(2, 4, 8, 8), torch.zeros(2, 8, 4, 4)
    with pytest.raises(ValueError) as info:
        hint(s, t)
    msg = str(info.value)
    for part in (
        "(2, 4, 8, 8)",
        "(2, 8, 4, 4)",
        "student.blocks.2",
        "teacher.layer3.1",
        "spatial='pool'",
    ):
        assert part in msg


def test_hint_channel_mismatch_names_shapes_and_modules():
    hint = HintLoss(4, 8, student_name="s.layer1", teacher_name="t.layer1")
    with pytest.raises(ValueError) as info:
        hint(torch.zeros(2, 6, 4, 4), torch.zeros(2, 8, 4, 4))
    msg = str(info.value)
    for part in ("(2, 6, 4, 4)", "(2, 8, 4, 4)", "s.layer1", "t.layer1", "student_channels=6"):
        assert part in msg


def test_hint_spatial_adapters():
    hint = _hint_with_weights([[1.0]], [0.0], spatial="pool")
    # student 4x4 with constant 2x2 blocks pools exactly onto the 2x2 teacher
    t = _t([[[[1.0, 2.0], [3.0, 4.0]]]])
    s = t.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert hint(s, t).item() == pytest.approx(0.0, abs=1e-12)
    hint.spatial = "interpolate"
    assert hint(
        torch.ones(1, 1, 4, 4, dtype=torch.float64), torch.ones(1, 1, 2, 2, dtype=torch.float64)
    ).item() == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------ attention transfer


def test_attention_hand_value():
    # teacher map |A|^2 = [1, 0, 0, 0] -> Q_t = [1, 0, 0, 0]
    # student 2 channels [[1, 1], [0, 0]] and [[1, -1], [0, 0]]: mean |A|^2 = [1, 1, 0, 0]
    #   -> Q_s = [1, 1, 0, 0] / sqrt 2 ; ||Q_s - Q_t|| = sqrt((1 - 1/sqrt2)^2 + 1/2) = sqrt(2 - sqrt2)
    t = _t([[[[1.0, 0.0], [0.0, 0.0]]]])
    s = _t([[[[1.0, 1.0], [0.0, 0.0]], [[1.0, -1.0], [0.0, 0.0]]]])
    torch.testing.assert_close(attention_map(s), _t([[1.0, 1.0, 0.0, 0.0]]) / math.sqrt(2))
    assert attention_loss(s, t).item() == pytest.approx(math.sqrt(2 - math.sqrt(2)), rel=1e-12)
    # batch mean: second sample identical -> half the value
    s2, t2 = torch.cat([s, t.expand(1, 2, 2, 2)]), torch.cat([t, t])
    assert AttentionTransferLoss()(s2, t2).item() == pytest.approx(math.sqrt(2 - math.sqrt(2)) / 2)


def test_attention_zero_when_equal_positive_otherwise():
    torch.manual_seed(0)
    f = torch.randn(3, 4, 5, 5)
    assert attention_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert attention_loss(f, torch.randn(3, 6, 5, 5)).item() > 0.1


def test_attention_pools_spatial_mismatch():
    t = _t([[[[1.0, 2.0], [3.0, 4.0]]]])
    s = t.sqrt().repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # energy pools to t
    assert attention_loss(s, t.sqrt()).item() == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------- RKD


def test_rkd_distance_hand_value():
    # teacher 1-D points 0, 1, 2: distances 1, 2, 1 (mean 4/3) -> .75, 1.5, .75
    # student 0, 1, 3:           distances 1, 3, 2 (mean 2)   -> .5, 1.5, 1
    # diffs .25, 0, .25 -> smooth-L1 .03125 each, twice each (symmetric) / 9 entries = 1/72
    loss = rkd_distance_loss(_t([[0.0], [1.0], [3.0]]), _t([[0.0], [1.0], [2.0]]))
    assert loss.item() == pytest.approx(1 / 72, rel=1e-6)


def _angles_reference(x):
    b = len(x)
    out = np.zeros((b, b, b))
    for i in range(b):
        for j in range(b):
            for k in range(b):
                u, v = x[j] - x[i], x[k] - x[i]
                if np.linalg.norm(u) > 0 and np.linalg.norm(v) > 0:
                    out[i, j, k] = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
    return out


def _smooth_l1(d):
    d = np.abs(d)
    return float(np.where(d < 1, 0.5 * d * d, d - 0.5).mean())


def test_rkd_angle_hand_value():
    # teacher: right isosceles triangle, cosines 0, 1/sqrt2, 1/sqrt2 at the vertices;
    # student: collinear 0, 1, 2 on the x-axis, cosines 1, -1, 1.
    # smooth-L1 per ordered pair: .5 + 1.2071 + .0429 = 1.75, two orders -> 3.5 / 27 = 7/54
    teacher = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    student = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    loss = rkd_angle_loss(torch.from_numpy(student), torch.from_numpy(teacher))
    assert loss.item() == pytest.approx(7 / 54, rel=1e-9)
    assert loss.item() == pytest.approx(
        _smooth_l1(_angles_reference(student) - _angles_reference(teacher))
    )


def test_rkd_random_matches_numpy_reference():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(5, 3)), rng.normal(size=(5, 4))
    got = rkd_angle_loss(torch.from_numpy(s), torch.from_numpy(t)).item()
    assert got == pytest.approx(_smooth_l1(_angles_reference(s) - _angles_reference(t)), rel=1e-9)


def test_rkd_zero_when_equal_and_scale_invariant_positive_otherwise():
    torch.manual_seed(0)
    f = torch.randn(6, 2, 3, 3, dtype=torch.float64)
    rkd = RKDLoss()  # paper weights 25 / 50
    assert rkd(f, f.clone()).item() == pytest.approx(0.0, abs=1e-10)
    assert rkd(3.0 * f, f).item() == pytest.approx(0.0, abs=1e-10)  # relations are scale-free
    other = torch.randn(6, 18, dtype=torch.float64)
    assert rkd(f, other).item() > 0.1
    weighted = RKDLoss(distance_weight=1.0, angle_weight=2.0)(f, other)
    want = rkd_distance_loss(f, other) + 2.0 * rkd_angle_loss(f, other)
    assert weighted.item() == pytest.approx(want.item(), rel=1e-12)


def test_rkd_needs_enough_samples():
    with pytest.raises(ValueError, match="at least 3"):
        rkd_angle_loss(torch.zeros(2, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="batch sizes"):
        rkd_distance_loss(torch.zeros(3, 4), torch.zeros(4, 4))


# ----------------------------------------------------------- similarity-preserving


def test_similarity_hand_value():
    # teacher [[1,0],[0,1]] -> G_t = I ; student [[1,0],[1,0]] -> G = ones -> rows / sqrt2
    # ||G_s - G_t||_F^2 = 2 * ((1 - 1/sqrt2)^2 + 1/2) = 4 - 2 sqrt2 ; / B^2 = 1 - 1/sqrt2
    loss = similarity_preserving_loss(_t([[1.0, 0.0], [1.0, 0.0]]), _t([[1.0, 0.0], [0.0, 1.0]]))
    assert loss.item() == pytest.approx(1 - 1 / math.sqrt(2), rel=1e-12)


def test_similarity_zero_when_equal_positive_otherwise():
    torch.manual_seed(0)
    f = torch.randn(4, 3, 2, 2)
    sp = SimilarityPreservingLoss()
    assert sp(f, f.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert sp(f, torch.randn(4, 7)).item() > 0.01
