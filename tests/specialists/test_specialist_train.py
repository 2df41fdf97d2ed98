"""Tests for specialists.train: half-and-half batches, balanced holdout, evaluation, init invariant."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from generalist.models import create_model
from specialists.model import build_specialist
from specialists.sampler import HalfAndHalfBatchSampler, specialist_targets
from specialists.train import (
    balanced_holdout,
    evaluate_specialist,
    init_invariant_maxdiff,
    sampled_batches,
)

GROUP = (4, 1, 7)


def _labels(n_per_class: int = 6, num_classes: int = 10) -> torch.Tensor:
    return torch.arange(num_classes).repeat(n_per_class)  # (60,)


def test_sampled_batches_are_half_in_group_with_specialist_targets():
    labels = _labels()
    images = (labels.view(-1, 1, 1, 1) * 20).to(torch.uint8).expand(-1, 1, 4, 4).contiguous()
    targets = specialist_targets(labels, GROUP)
    sampler = HalfAndHalfBatchSampler(labels, GROUP, batch_size=8, seed=3)
    batches = list(sampled_batches(images, targets, sampler))
    assert len(batches) == len(sampler) == math.ceil(18 / 4)
    for x, y in batches:
        assert x.shape == (8, 1, 4, 4) and x.dtype == torch.float32
        assert int((y < len(GROUP)).sum()) == 4 and int((y == len(GROUP)).sum()) == 4
        # the pixel value encodes the original label: targets must follow the same examples
        original = (x[:, 0, 0, 0] * 255 / 20).round().long()
        assert torch.equal(y, specialist_targets(original, GROUP))


def test_sampled_batches_reject_mismatched_lengths():
    labels = _labels()
    sampler = HalfAndHalfBatchSampler(labels, GROUP, batch_size=4)
    with pytest.raises(ValueError, match="one entry per training example"):
        next(sampled_batches(torch.zeros(5, 1, 2, 2, dtype=torch.uint8), labels, sampler))


def test_balanced_holdout_takes_every_group_example_and_as_many_others():
    labels = _labels()
    idx = balanced_holdout(labels, GROUP, seed=0)
    inside = [i for i in idx.tolist() if int(labels[i]) in GROUP]
    outside = [i for i in idx.tolist() if int(labels[i]) not in GROUP]
    assert len(inside) == 18 and len(outside) == 18 and len(set(idx.tolist())) == 36
    assert torch.equal(idx, balanced_holdout(labels, GROUP, seed=0))
    assert not torch.equal(idx, balanced_holdout(labels, GROUP, seed=1))


def test_balanced_holdout_without_group_examples_says_so():
    with pytest.raises(ValueError, match="no holdout example has a label in group"):
        balanced_holdout(torch.tensor([0, 0, 2]), GROUP, seed=0)


class FixedLogits(nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[x[:, 0, 0, 0].long()]  # the image's first pixel is its row index


def test_evaluate_specialist_against_hand_computed_values():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    targets = torch.tensor([0, 1, 2, 2])  # dustbin index 2
    images = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1)
    got = evaluate_specialist(FixedLogits(logits), images, targets, dustbin_index=2, batch_size=3)
    expected_loss = torch.nn.functional.cross_entropy(logits, targets).item()
    assert got["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert got["top1"] == pytest.approx(2 / 4)  # rows 0 and 2 right, row 1 says dustbin, row 3 class 0
    assert got["group_top1"] == pytest.approx(2 / 2)  # in-group rows 0, 1: argmax over classes 0..1
    assert got["examples"] == 4


def test_untrained_specialist_reproduces_the_collapsed_generalist():
    torch.manual_seed(0)
    generalist = create_model("cnn", num_classes=10, in_channels=1, image_size=16, width=0.25).eval()
    images = torch.randint(0, 256, (32, 1, 16, 16), dtype=torch.uint8)
    for finetune in ("all", "head", "last_n"):
        specialist = build_specialist(generalist, GROUP, finetune=finetune)
        assert init_invariant_maxdiff(generalist, specialist, images) <= 1e-5
    with torch.no_grad():
        specialist.head.bias[0] += 1.0
    assert init_invariant_maxdiff(generalist, specialist, images) > 1e-3


def test_generalist_targets_collapse_soften_and_shift_to_the_training_mix():
    import math

    from specialists.train import generalist_targets

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))  # p over K = 3
    # group (0,), T = 1: collapsed (0.5, 0.5); a dustbin shift of log(1/4) -> (0.5, 0.125) / 0.625
    out = generalist_targets(logits, [0], temperature=1.0, dustbin_shift=math.log(0.25))
    assert torch.allclose(out, torch.tensor([[0.8, 0.2]]), atol=1e-6)
    # T = 2 softens before collapsing: p^(1/2) normalised
    soft = torch.tensor([0.5, 0.3, 0.2]).sqrt()
    soft = soft / soft.sum()
    out = generalist_targets(logits, [1, 2], temperature=2.0, dustbin_shift=0.0)
    assert torch.allclose(out, torch.stack([soft[1], soft[2], soft[0]])[None], atol=1e-6)


def test_soft_target_loss_mixes_hard_and_soft_terms():
    import torch.nn.functional as F

    from specialists.train import SoftTargetLoss

    gen = torch.nn.Linear(4, 3)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 1, 0, 1])
    loss = SoftTargetLoss(gen, [0], weight=0.25, temperature=2.0, dustbin_shift=0.0)
    with pytest.raises(RuntimeError, match="set_batch"):
        loss(torch.zeros(5, 2), y)
    loss.set_batch(x)
    z = torch.randn(5, 2)
    targets = loss._targets
    expected = 0.75 * F.cross_entropy(z, y) + 0.25 * 4 * F.kl_div(F.log_softmax(z / 2, 1), targets,
                                                                  reduction="batchmean")
    assert torch.allclose(loss(z, y), expected)
    with pytest.raises(ValueError, match="weight"):
        SoftTargetLoss(gen, [0], weight=0.0, temperature=2.0, dustbin_shift=0.0)
