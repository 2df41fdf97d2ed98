"""Loss registry (generalist.registry.Registry, losses registered where they are defined) and CombinedLoss."""

import pytest
import torch

from distill import (
    LOSSES,
    ActivationBoundaryLoss,
    AttentionTransferLoss,
    CCLoss,
    CombinedLoss,
    CRDLoss,
    DISTLoss,
    DKDLoss,
    FactorTransferLoss,
    FSPLoss,
    HintLoss,
    IRGLoss,
    KDLoss,
    NSTLoss,
    PKTLoss,
    RKDLoss,
    SimilarityPreservingLoss,
    create_loss,
    kd_loss,
    list_losses,
)

KNOWN = ["ab", "attention", "cc", "crd", "dist", "dkd", "fsp", "ft", "hint", "irg", "kd", "nst", "pkt",
         "rkd", "similarity"]


def test_list_and_create():
    assert list_losses() == KNOWN
    kd = create_loss("kd", temperature=4.0, alpha=0.9)
    assert isinstance(kd, KDLoss) and kd.temperature == 4.0 and kd.alpha == 0.9


def test_each_loss_is_registered_by_its_own_module():
    assert [LOSSES.get(n) for n in list_losses()] == [
        ActivationBoundaryLoss, AttentionTransferLoss, CCLoss, CRDLoss, DISTLoss, DKDLoss, FSPLoss,
        FactorTransferLoss, HintLoss, IRGLoss, KDLoss, NSTLoss, PKTLoss, RKDLoss, SimilarityPreservingLoss]
    assert isinstance(create_loss("Similarity"), SimilarityPreservingLoss)  # names are normalised
    with pytest.raises(ValueError, match="already registered"):
        LOSSES.add("kd", HintLoss)


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as info:
        create_loss("hnit")
    msg = str(info.value)
    assert "unknown loss 'hnit'; did you mean 'hint'?" in msg
    assert f"known losses: {', '.join(KNOWN)}." in msg


def test_bad_kwargs_become_value_error():
    with pytest.raises(ValueError, match=r"bad arguments for loss 'kd'.*temperature.*expected kd\(temperature"):
        create_loss("kd", temp=4.0)
    with pytest.raises(ValueError, match="bad arguments for loss 'hint'.*teacher_channels"):
        create_loss("hint", student_channels=3)
    with pytest.raises(ValueError, match="alpha must lie in"):  # the constructor's own check, not hidden
        create_loss("kd", temperature=4.0, alpha=2.0)


def test_combined_total_and_terms():
    torch.manual_seed(0)
    zs, zt, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    fs, ft = torch.randn(4, 3, 2, 2), torch.randn(4, 6, 2, 2)
    hint = HintLoss(3, 6)
    combined = CombinedLoss(
        {"kd": 1.0, "hint:blocks.2": 0.5, "similarity": 2.0},
        losses={"hint:blocks.2": hint},
        loss_kwargs={"kd": {"temperature": 2.0, "alpha": 0.5}},
    )
    total, terms = combined(
        {
            "kd": {"student_logits": zs, "labels": y, "teacher_logits": zt},
            "hint:blocks.2": (fs, ft),
            "similarity": (fs, ft),
        }
    )
    assert list(terms) == ["kd", "hint:blocks.2", "similarity"]
    want_kd = kd_loss(zs, y, zt, temperature=2.0, alpha=0.5)
    assert terms["kd"].item() == pytest.approx(want_kd.item())
    assert terms["hint:blocks.2"].item() == pytest.approx(hint(fs, ft).item())
    want = terms["kd"] + 0.5 * terms["hint:blocks.2"] + 2.0 * terms["similarity"]
    assert total.item() == pytest.approx(want.item(), rel=1e-6)
    assert all(not v.requires_grad for v in terms.values())
    # the hint regressor is a parameter of the combined loss and gets gradients
    assert any(p is hint.regressor.weight for p in combined.parameters())
    total.backward()
    assert hint.regressor.weight.grad is not None


def test_combined_validation():
    with pytest.raises(ValueError, match="known losses"):
        CombinedLoss({"kd2": 1.0})
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        CombinedLoss({"similarity": -1.0})
    with pytest.raises(ValueError, match="no weight"):
        CombinedLoss({"similarity": 1.0}, loss_kwargs={"kd": {}})
    combined = CombinedLoss({"similarity": 1.0, "attention": 1.0})
    with pytest.raises(ValueError, match=r"missing \['attention'\], unexpected \['sp'\]"):
        combined({"similarity": (torch.zeros(2, 2), torch.zeros(2, 2)), "sp": ()})
