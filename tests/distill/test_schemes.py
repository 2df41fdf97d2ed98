"""Deep mutual learning's loss and epoch, the teacher assistant's width."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from distill import MutualGroup, mutual_learning_loss
from distill.schemes import assistant_width, mutual_one_epoch


def test_mutual_loss_hand_computed():
    # student 1 uniform, student 2 (3/4, 1/4); true class 0, T = 1
    logits = torch.tensor([[[0.0, 0.0]], [[math.log(3.0), 0.0]]])
    total, terms = mutual_learning_loss(logits, torch.tensor([0]))
    ce_1, ce_2 = math.log(2), -math.log(0.75)
    kl_1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)   # KL(p_2 || p_1)
    kl_2 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)     # KL(p_1 || p_2)
    assert terms["ce_1"].item() == pytest.approx(ce_1) and terms["kl_1"].item() == pytest.approx(kl_1)
    assert terms["ce_2"].item() == pytest.approx(ce_2) and terms["kl_2"].item() == pytest.approx(kl_2)
    assert total.item() == pytest.approx(ce_1 + ce_2 + kl_1 + kl_2)


def test_each_member_is_pulled_only_by_its_own_loss():
    """Peers' predictions are detached: the gradient w.r.t. member i's logits is that of L_i alone,
    and the KL part is the mean over the M - 1 peers (T^2 scaled)."""
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 5, requires_grad=True)
    y = torch.randint(0, 5, (4,))
    mutual_learning_loss(logits, y, temperature=2.0)[0].backward()
    for i in range(3):
        own = logits.detach().clone().requires_grad_(True)
        log_p = torch.log_softmax(own[i] / 2.0, dim=1)
        peers = [torch.softmax(logits[j].detach() / 2.0, dim=1) for j in range(3) if j != i]
        kl = sum((p * (p.log() - log_p)).sum(1).mean() for p in peers) / 2 * 4.0
        (nn.functional.cross_entropy(own[i], y) + kl).backward()
        torch.testing.assert_close(logits.grad[i], own.grad[i])


def test_a_group_of_one_is_refused():
    with pytest.raises(ValueError, match="at least 2 students"):
        MutualGroup([nn.Linear(2, 3)])
    with pytest.raises(ValueError, match="a group of one has no one to learn from"):
        mutual_learning_loss(torch.zeros(1, 2, 3), torch.tensor([0, 1]))


def test_mutual_epoch_trains_every_member():
    torch.manual_seed(1)
    x = torch.randn(64, 6)
    y = (x[:, 0] > 0).long()
    group = MutualGroup([nn.Linear(6, 2), nn.Linear(6, 2)])
    optimizer = torch.optim.SGD(group.parameters(), lr=0.5)
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    first = mutual_one_epoch(group, batches, optimizer, None)
    for _ in range(5):
        last = mutual_one_epoch(group, batches, optimizer, None)
    assert last["loss"] < first["loss"] and last["acc_1"] > 0.8 and last["acc_2"] > 0.8
    assert set(first) == {"loss", "ce_1", "kl_1", "ce_2", "kl_2", "acc_1", "acc_2"}


def test_assistant_width():
    assert assistant_width(0.5, 1.0) == 0.75
    assert assistant_width(0.5, 1.0, 0.6) == 0.6
    with pytest.raises(ValueError, match="strictly between the student's"):
        assistant_width(0.5, 1.0, 0.4)
