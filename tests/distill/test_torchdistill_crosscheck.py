"""Our losses against torchdistill's own modules on the same inputs (the optional ``bench`` extra:
``pip install -c constraints.txt -e '.[bench]'``)."""

from __future__ import annotations

import pytest
import torch

torchdistill = pytest.importorskip(
    "torchdistill", reason="torchdistill is not installed (optional: pip install -e '.[bench]')")
mid_level = pytest.importorskip("torchdistill.losses.mid_level")

from distill import (  # noqa: E402  (after the skip)
    activation_boundary_loss,
    dist_loss,
    kd_loss,
    pkt_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    similarity_preserving_loss,
)


def _io(value: torch.Tensor, path: str = "fc", io: str = "output") -> dict:
    return {path: {io: value}}


def test_kd_matches_torchdistill():
    """torchdistill's alpha weights the cross-entropy and beta = 1 - alpha the T^2 * KL term:
    our alpha = a is its alpha = 1 - a."""
    torch.manual_seed(0)
    zs, zt, y = torch.randn(16, 10), 3 * torch.randn(16, 10), torch.randint(0, 10, (16,))
    for alpha, temperature in ((0.9, 4.0), (0.5, 2.0), (0.3, 1.0)):
        theirs = mid_level.KDLoss("fc", "output", "fc", "output", temperature=temperature, alpha=1 - alpha)
        torch.testing.assert_close(kd_loss(zs, y, teacher_logits=zt, temperature=temperature, alpha=alpha),
                                   theirs(_io(zs), _io(zt), y), atol=1e-5, rtol=1e-5)


def test_other_losses_match_torchdistill():
    torch.manual_seed(1)
    zs, zt = torch.randn(12, 8), torch.randn(12, 8)
    dist = mid_level.DISTLoss("fc", "output", "fc", "output", beta=2.0, gamma=1.0, tau=4.0)
    torch.testing.assert_close(dist_loss(zs, zt, beta=2.0, gamma=1.0, temperature=4.0),
                               dist(_io(zs), _io(zt)), atol=1e-5, rtol=1e-5)
    fs, ft = torch.randn(12, 6), torch.randn(12, 20)
    pkt = mid_level.PKTLoss("pool", "output", "pool", "output")
    torch.testing.assert_close(pkt_loss(fs, ft), pkt(_io(fs.clone(), "pool"), _io(ft.clone(), "pool")))
    rkd = mid_level.RKDLoss("pool", "pool", dist_factor=1.0, angle_factor=2.0, reduction="mean")
    ours = rkd_distance_loss(fs, ft) + 2.0 * rkd_angle_loss(fs, ft)
    torch.testing.assert_close(ours, rkd(_io(fs, "pool"), _io(ft, "pool")), atol=1e-5, rtol=1e-5)
    # torchdistill's SPKDLoss calls normalize(G, 1): p = 1, rows scaled to unit L1 norm; the paper
    # (and ours) scales them to unit L2 norm. Same loss once the norm is the same:
    sp = mid_level.SPKDLoss("pool", "pool", reduction="batchmean")

    def sp_with(p: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        g_a, g_b = (torch.nn.functional.normalize(x @ x.t(), p=p, dim=1) for x in (a, b))
        return (g_a - g_b).pow(2).sum() / a.shape[0] ** 2

    torch.testing.assert_close(sp_with(1.0, fs, ft), sp(_io(fs, "pool"), _io(ft, "pool")))
    torch.testing.assert_close(similarity_preserving_loss(fs, ft), sp_with(2.0, fs, ft))
    r, t = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    ab = mid_level.AltActTransferLoss({"p": {"student": {"path": "c", "io": "output"},
                                             "teacher": {"path": "l", "io": "output"}}}, margin=1.0, reduction="mean")
    torch.testing.assert_close(activation_boundary_loss(r, t), ab(_io(r, "c"), _io(t, "l")))
