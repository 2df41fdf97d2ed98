"""PKT, CC, IRG and CRD against hand-computed values and against the reference implementations'
formulas (RepDistiller, torchdistill)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distill import CRDLoss, cc_loss, correlation_matrix, create_loss, irg_loss, nce_loss, pkt_loss


def test_pkt_hand_computed():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])   # cosines I -> rows (2/3, 1/3), (1/3, 2/3)
    t = torch.tensor([[1.0, 0.0], [2.0, 0.0]])   # cosines all 1 -> rows (1/2, 1/2)
    want = 2 * (0.5 * math.log(0.5 / (2 / 3)) + 0.5 * math.log(0.5 / (1 / 3))) / 4
    assert pkt_loss(s, t).item() == pytest.approx(want, abs=1e-6)


def _repdistiller_pkt(f_s, f_t, eps=1e-7):
    """distiller_zoo/PKT.py (HobbitLong/RepDistiller), from its equations: rows divided by
    (norm + eps), cosine matrices mapped to [0, 1] by (c + 1) / 2, rows normalised to sum 1,
    mean of p_t * log((p_t + eps) / (p_s + eps))."""
    def probs(x):
        x = x / (x.pow(2).sum(1, keepdim=True).sqrt() + eps)
        c = (x @ x.t() + 1) / 2
        return c / c.sum(1, keepdim=True)
    p_s, p_t = probs(f_s), probs(f_t)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def test_pkt_equals_the_repdistiller_formula():
    torch.manual_seed(0)
    s, t = torch.randn(8, 5), torch.randn(8, 12)
    torch.testing.assert_close(create_loss("pkt")(s, t), _repdistiller_pkt(s, t))


def test_cc_hand_computed():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])   # correlations: identity
    t = torch.tensor([[1.0, 0.0], [3.0, 0.0]])   # normalised rows equal: all ones
    assert cc_loss(s, t, kernel="bilinear").item() == pytest.approx(2 / 4)
    # gaussian, gamma 0.4, order 2: entry = e^-0.8 (1 + 0.8 x + 0.32 x^2): 2.12 e^-0.8 at x = 1, e^-0.8 at 0
    want = 2 * (1.12 * math.exp(-0.8)) ** 2 / 4
    assert cc_loss(s, t, kernel="gaussian", gamma=0.4, order=2).item() == pytest.approx(want, abs=1e-6)


def test_cc_matrix_equals_the_torchdistill_formula():
    """torchdistill/losses/mid_level.py CCKDLoss.compute_cc_mat_by_gaussian_rbf, from its equations:
    row i = exp(-2 gamma) * (1 + sum_{p=1..P} (2 gamma)^p / p! * (e_i . E^T)^p). Its loss is
    torch.dist(C_s, C_t) / B^2 (the Frobenius norm); ours is the paper's squared norm / B^2."""
    torch.manual_seed(1)
    e_s = F.normalize(torch.randn(6, 4), dim=1)
    e_t = F.normalize(torch.randn(6, 9), dim=1)
    gamma, order = 0.4, 3

    def reference(e):
        rows = []
        for row in e:
            value = 1 + sum((2 * gamma) ** p / math.factorial(p) * (row @ e.t()) ** p for p in range(1, order + 1))
            rows.append(value * math.exp(-2 * gamma))
        return torch.stack(rows)

    torch.testing.assert_close(correlation_matrix(e_s, "gaussian", gamma, order), reference(e_s))
    their_loss = torch.dist(reference(e_s), reference(e_t), 2) / 36
    ours = create_loss("cc", gamma=gamma, order=order)(e_s, e_t)
    torch.testing.assert_close(ours, (their_loss * 36) ** 2 / 36)


def test_irg_hand_computed():
    s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])  # squared distances 1, 4, 5 -> / 5
    t = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]])  # 4, 4, 8 -> / 8
    # edges differ by -0.3, 0.3 (each twice) and 0: MSE 4 * 0.09 / 9; vertices: MSE 1 / 6
    assert irg_loss(s, t, vertex_weight=0.0).item() == pytest.approx(0.04, abs=1e-6)
    assert irg_loss(s, t).item() == pytest.approx(0.04 + 1 / 6, abs=1e-6)
    assert irg_loss(s, t, vertex_weight=2.0, edge_weight=0.5).item() == pytest.approx(0.02 + 2 / 6, abs=1e-6)
    with pytest.raises(ValueError, match=r"vertex term compares features of equal shape.*\(3, 2\).*\(3, 5\)"):
        irg_loss(s, torch.randn(3, 5))
    assert irg_loss(s, torch.randn(3, 5), vertex_weight=0.0) >= 0


def test_nce_hand_computed():
    scores = torch.tensor([[0.5, 0.1, 0.2]])   # positive, then K = 2 negatives; M = 4: noise K/M = 0.5
    want = -(math.log(0.5 / 1.0) + math.log(0.5 / 0.6) + math.log(0.5 / 0.7))
    assert nce_loss(scores, 4).item() == pytest.approx(want, abs=1e-5)


def _repdistiller_crd(f_s, f_t, crd, slots, momentum):
    """crd/criterion.py + crd/memory.py (HobbitLong/RepDistiller), from their equations, with the
    module's own heads and bank: v = normalize(linear(f)); out_v1 = exp(mem_v2[idx] . v1 / T),
    out_v2 = exp(mem_v1[idx] . v2 / T); Z = mean(out) * n_data on the first call; ContrastLoss with
    Pn = 1 / n_data on both; then mem[y] <- normalize(momentum * mem[y] + (1 - momentum) * v)."""
    v1 = F.normalize(crd.embed_s(f_s), dim=1)
    v2 = F.normalize(crd.embed_t(f_t), dim=1)
    n, k = crd.memory_size, slots.shape[1] - 1
    out_v1 = torch.exp(torch.einsum("bkd,bd->bk", crd.memory_t[slots], v1) / crd.nce_temperature)
    out_v2 = torch.exp(torch.einsum("bkd,bd->bk", crd.memory_s[slots], v2) / crd.nce_temperature)
    out_v1, out_v2 = out_v1 / (out_v1.mean() * n), out_v2 / (out_v2.mean() * n)

    def contrast(x):
        pn = 1 / n
        d1 = torch.log(x[:, 0] / (x[:, 0] + k * pn + 1e-7))
        d0 = torch.log((k * pn) / (x[:, 1:] + k * pn + 1e-7))
        return -(d1.sum() + d0.sum()) / x.shape[0]

    pos = slots[:, 0]
    new_s = F.normalize(crd.memory_s[pos] * momentum + v1 * (1 - momentum), dim=1)
    return contrast(out_v1) + contrast(out_v2), new_s


def test_crd_equals_the_repdistiller_formula_and_updates_its_bank():
    torch.manual_seed(2)
    crd = CRDLoss(student_dim=6, teacher_dim=10, num_examples=20, embed_dim=8, negatives=5, momentum=0.5)
    f_s, f_t = torch.randn(4, 6), torch.randn(4, 10)
    ids = torch.tensor([3, 7, 11, 19])
    slots = torch.cat([ids[:, None], torch.randint(0, 20, (4, 5))], dim=1)
    with torch.no_grad():
        want, new_s = _repdistiller_crd(f_s, f_t, crd, slots, 0.5)
    ours = crd(f_s, f_t, ids, contrast_slots=slots)
    torch.testing.assert_close(ours, want)
    torch.testing.assert_close(crd.memory_s[ids], new_s)
    assert (crd.normalizers > 0).all()
    ours.backward()
    assert crd.embed_s.weight.grad is not None and crd.embed_t.weight.grad is not None


def test_crd_bank_is_bounded_and_shared_by_modulo():
    crd = CRDLoss(student_dim=3, teacher_dim=3, num_examples=50, memory_size=10, embed_dim=4)
    assert crd.memory_s.shape == (10, 4) and crd.negatives == 9
    before = crd.memory_s.clone()
    crd(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([13, 40]))
    changed = (crd.memory_s != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [0, 3]    # examples 13 and 40 live in slots 3 and 0
    crd.eval()
    frozen = crd.memory_s.clone()
    crd(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([1, 2]))
    assert torch.equal(crd.memory_s, frozen)   # evaluation does not move the bank
    with pytest.raises(ValueError, match=r"memory_size=60 is larger than the training set \(50 examples\)"):
        CRDLoss(student_dim=3, teacher_dim=3, num_examples=50, memory_size=60)
    with pytest.raises(ValueError, match=r"negatives=10 must lie in \[1, memory_size - 1 = 9\]"):
        CRDLoss(student_dim=3, teacher_dim=3, num_examples=50, memory_size=10, negatives=10)
