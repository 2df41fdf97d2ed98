"""The one soft-target formula and top-k completion, against hand-computed values."""

import pytest
import torch

from distill.targets import complete_topk, log_soft_targets, soft_targets


@pytest.mark.parametrize("temperature", [1.0, 2.0, 10.0])
def test_soft_targets_keep_exact_zeros_at_every_temperature(temperature):
    q = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    out = soft_targets(q, temperature)
    powered = q ** (1.0 / temperature)
    expected = powered / powered.sum(dim=1, keepdim=True)
    assert torch.allclose(out, expected, atol=1e-12)
    assert out[0, 3].item() == 0.0 and out[1, 0].item() == 0.0
    assert torch.allclose(out.sum(dim=1), torch.ones(2, dtype=torch.float64))


def test_soft_targets_hand_computed_at_t2():
    # q = (0.64, 0.36): q^(1/2) = (0.8, 0.6) -> (0.8/1.4, 0.6/1.4)
    out = soft_targets(torch.tensor([[0.64, 0.36]]), 2.0)
    assert torch.allclose(out, torch.tensor([[0.8 / 1.4, 0.6 / 1.4]]), atol=1e-6)


def test_log_soft_targets_is_minus_inf_at_zeros_and_half_is_float32():
    out = log_soft_targets(torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float16), 4.0)
    assert out.dtype == torch.float32 and out[0, 2].item() == float("-inf")


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan"), True])
def test_soft_targets_reject_bad_temperature(bad):
    with pytest.raises(ValueError, match="temperature"):
        soft_targets(torch.tensor([[1.0]]), bad)


def test_soft_targets_reject_rows_without_mass_and_negative_entries():
    with pytest.raises(ValueError, match="row of zeros"):
        soft_targets(torch.zeros(1, 3), 1.0)
    with pytest.raises(ValueError, match="non-negative"):
        soft_targets(torch.tensor([[1.5, -0.5]]), 1.0)


def test_complete_topk_spreads_the_residual_over_the_classes_not_kept():
    values = torch.tensor([[0.6, 0.2]])
    ids = torch.tensor([[3, 0]])
    out = complete_topk(values, ids, num_classes=5)
    assert torch.allclose(out, torch.tensor([[0.2, 0.2 / 3, 0.2 / 3, 0.6, 0.2 / 3]]))
    explicit = complete_topk(values, ids, num_classes=5, residual=torch.tensor([0.0]))
    assert explicit[0, 1].item() == 0.0 and explicit[0, 3].item() == pytest.approx(0.6)


def test_complete_topk_fills_each_row_from_its_own_ids_and_mass():
    values = torch.tensor([[0.6, 0.2], [0.5, 0.5]])
    ids = torch.tensor([[3, 0], [1, 2]])
    # row 0: residual 0.2 over classes 1, 2; row 1 holds all its mass: the rest stays exactly zero
    expected = torch.tensor([[0.2, 0.1, 0.1, 0.6], [0.0, 0.5, 0.5, 0.0]])
    torch.testing.assert_close(complete_topk(values, ids, num_classes=4), expected)
    out = complete_topk(values, ids, num_classes=4, residual=torch.tensor([0.1, 0.0]))
    assert out[0, 1].item() == pytest.approx(0.05) and out[1, 0].item() == 0.0
    half = complete_topk(values.half(), ids, num_classes=4)
    assert half.dtype == torch.float32 and torch.allclose(half, expected, atol=1e-3)


def test_complete_topk_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        complete_topk(torch.ones(2, 3), torch.zeros(2, 2, dtype=torch.long), num_classes=4)
    with pytest.raises(ValueError, match="num_classes"):
        complete_topk(torch.ones(1, 3), torch.zeros(1, 3, dtype=torch.long), num_classes=2)
