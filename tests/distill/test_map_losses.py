"""FSP, NST, factor transfer and activation boundaries against hand-computed values and against the
formulas of RepDistiller and torchdistill."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distill import (
    ActivationBoundaryLoss,
    FactorTransferLoss,
    activation_boundary_loss,
    create_loss,
    factor_transfer_loss,
    fsp_loss,
    fsp_matrix,
    nst_loss,
    train_paraphraser,
)


def test_fsp_hand_computed():
    first = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 1, 2)  # two channels over 2 pixels
    second_s = torch.tensor([1.0, -1.0]).view(1, 1, 1, 2)
    second_t = torch.tensor([2.0, 0.0]).view(1, 1, 1, 2)
    torch.testing.assert_close(fsp_matrix(first, second_s), torch.tensor([[[-0.5], [-0.5]]]))
    torch.testing.assert_close(fsp_matrix(first, second_t), torch.tensor([[[1.0], [3.0]]]))
    # mean((-0.5 - 1)^2, (-0.5 - 3)^2) = (2.25 + 12.25) / 2
    assert fsp_loss([first, second_s], [first, second_t]).item() == pytest.approx(7.25)


def _repdistiller_fsp(g_s, g_t):
    """distiller_zoo/FSP.py (HobbitLong/RepDistiller), from its equations: for consecutive maps
    (bottom, top) pool the larger to the smaller with adaptive average pooling, fsp[b, j, i] =
    mean over pixels of top_j * bottom_i, loss of a pair = mean((fsp_s - fsp_t)^2), summed."""
    def fsp(g):
        out = []
        for bot, top in zip(g[:-1], g[1:], strict=True):
            h = min(bot.shape[2], top.shape[2])
            bot, top = F.adaptive_avg_pool2d(bot, (h, h)), F.adaptive_avg_pool2d(top, (h, h))
            out.append((bot.unsqueeze(1).flatten(3) * top.unsqueeze(2).flatten(3)).mean(-1))
        return out
    return sum((s - t).pow(2).mean() for s, t in zip(fsp(g_s), fsp(g_t), strict=True))


def test_fsp_equals_the_repdistiller_formula_and_checks_channels():
    torch.manual_seed(0)
    g_s = [torch.randn(3, 4, 8, 8), torch.randn(3, 6, 4, 4), torch.randn(3, 5, 4, 4)]
    g_t = [torch.randn(3, 4, 16, 16), torch.randn(3, 6, 8, 8), torch.randn(3, 5, 2, 2)]
    torch.testing.assert_close(create_loss("fsp")(g_s, g_t), _repdistiller_fsp(g_s, g_t))
    with pytest.raises(ValueError, match=r"give \(4, 6\) matrices but the teacher's .* give \(4, 7\)"):
        fsp_loss(g_s[:2], [g_t[0], torch.randn(3, 7, 8, 8)])
    with pytest.raises(ValueError, match=">= 2"):
        fsp_loss(g_s[:1], g_t[:1])


def test_nst_hand_computed():
    s = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    t = torch.tensor([1.0, 1.0]).view(1, 1, 1, 2)
    # k(t,t) = k(s,s) = 1, k(s,t) = (1/sqrt 2)^2 = 0.5
    assert nst_loss(s, t).item() == pytest.approx(1.0)
    two = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)
    # k(s,s) = identity (mean 0.5), k(t,t) = 1, k(s,t) = (0.5, 0.5)
    assert nst_loss(two, t).item() == pytest.approx(1.0 + 0.5 - 1.0)


def _repdistiller_nst(f_s, f_t):
    """distiller_zoo/NST.py (HobbitLong/RepDistiller), from its equations: pool the larger map to
    the smaller height, flatten pixels, L2-normalise each channel, poly kernel (a . b)^2, full MMD."""
    h = min(f_s.shape[2], f_t.shape[2])
    f_s, f_t = F.adaptive_avg_pool2d(f_s, (h, h)), F.adaptive_avg_pool2d(f_t, (h, h))
    f_s = F.normalize(f_s.flatten(2), dim=2)
    f_t = F.normalize(f_t.flatten(2), dim=2)

    def k(a, b):
        return (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2)
    return k(f_t, f_t).mean() + k(f_s, f_s).mean() - 2 * k(f_s, f_t).mean()


def test_nst_equals_the_repdistiller_formula():
    torch.manual_seed(1)
    s, t = torch.randn(4, 6, 8, 8), torch.randn(4, 10, 4, 4)
    torch.testing.assert_close(create_loss("nst")(s, t), _repdistiller_nst(s, t))


def test_factor_transfer_hand_computed_and_torchdistill_formula():
    s, t = torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0]])
    assert factor_transfer_loss(s, t).item() == pytest.approx((0.4 + 0.8) / 2)
    assert factor_transfer_loss(s, t, p=2).item() == pytest.approx(math.sqrt(0.8))
    # torchdistill/losses/mid_level.py FTLoss: flat factors divided by their L2 norms, l1_loss 'mean'
    torch.manual_seed(2)
    fs, ft = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    want = F.l1_loss(fs.flatten(1) / fs.flatten(1).norm(dim=1, keepdim=True),
                     ft.flatten(1) / ft.flatten(1).norm(dim=1, keepdim=True))
    torch.testing.assert_close(factor_transfer_loss(fs, ft), want)


def test_paraphraser_trains_first_then_stays_frozen():
    torch.manual_seed(3)
    loss = FactorTransferLoss(4, 8, rate=0.5, paraphraser_epochs=4, paraphraser_lr=1e-2)
    maps = [torch.relu(torch.randn(6, 8, 4, 4)) for _ in range(3)]
    before = {k: v.clone() for k, v in loss.paraphraser.state_dict().items()}
    history = train_paraphraser(loss, lambda epoch: iter(maps))
    assert len(history) == 4 and history[-1] < history[0]
    assert not loss.paraphraser.training and not any(p.requires_grad for p in loss.paraphraser.parameters())
    frozen = {k: v.clone() for k, v in loss.paraphraser.state_dict().items()}
    assert any(not torch.equal(before[k], frozen[k]) for k in before)
    value = loss.train()(torch.randn(6, 4, 8, 8, requires_grad=True), maps[0])  # student map pooled to 4x4
    value.backward()
    assert all(torch.equal(v, loss.paraphraser.state_dict()[k]) for k, v in frozen.items())  # BN stats too
    assert loss.translator[0].weight.grad is not None and loss.paraphraser.encoder[0].weight.grad is None


def test_activation_boundary_hand_computed():
    r = torch.tensor([-2.0, -0.5, 0.5, 2.0]).view(1, 4, 1, 1)
    t = torch.tensor([-1.0, -1.0, 1.0, 1.0]).view(1, 4, 1, 1)   # off, off, on, on
    # -2 off: beyond -m, 0; -0.5 off: (0.5)^2; 0.5 on: (0.5)^2; 2 on: beyond m, 0
    assert activation_boundary_loss(r, t, margin=1.0).item() == pytest.approx(0.5)
    assert activation_boundary_loss(r, torch.relu(t)).item() == pytest.approx(0.5)  # the sign survives a ReLU


def test_activation_boundary_equals_the_torchdistill_formula_and_checks_sizes():
    """torchdistill/losses/mid_level.py AltActTransferLoss (and RepDistiller's ABLoss before its
    3/1000 factor): ((r + m)^2 [r > -m, t <= 0] + (r - m)^2 [r <= m, t > 0]).sum() / B."""
    torch.manual_seed(4)
    r, t = torch.randn(3, 5, 4, 4), torch.randn(3, 5, 4, 4)
    m = 0.7
    want = ((r + m) ** 2 * ((r > -m) & (t <= 0)).float() + (r - m) ** 2 * ((r <= m) & (t > 0)).float()).sum() / 3
    torch.testing.assert_close(activation_boundary_loss(r, t, margin=m), want)
    module = ActivationBoundaryLoss(2, 5)
    assert module(torch.randn(3, 2, 4, 4), t).dim() == 0
    with pytest.raises(ValueError, match=r"cannot match student map \(3, 2, 8, 8\) to teacher map \(3, 5, 4, 4\)"):
        module(torch.randn(3, 2, 8, 8), t)
