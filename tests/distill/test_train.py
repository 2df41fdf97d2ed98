"""Student-training components: the objective, one distillation epoch, teachers, evaluation, latency.

The T^2 gradient scaling of the soft-target loss itself is checked in test_kd.py; here it is
checked end to end, through the objective, the probability (ensemble q) path and a model.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill.features import FeatureExtractor
from distill.latency import measure_latency_ms
from distill.train import (
    DistillObjective,
    TeacherOutput,
    build_objective,
    distill_one_epoch,
    evaluate_predictor,
    feature_pairs,
    iterate_indexed_batches,
    make_teacher,
    probe_feature_shapes,
)
from generalist.models import create_model
from generalist.train import build_optimizer, iterate_batches


def _tiny(seed: int, width: float = 0.125) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("cnn", num_classes=4, in_channels=1, image_size=8, width=width)


def _previous_objective(zs, y, zt, q, temperature, alpha):
    """The objective's formula before it called distill.losses.kd_loss_terms, kept verbatim."""
    logits = zs.float()
    ce = F.cross_entropy(logits, y)
    total = (1.0 - alpha) * ce
    if alpha > 0:
        log_p_t = F.log_softmax((q.log() if q is not None else zt) / temperature, dim=-1)
        log_p_s = F.log_softmax(logits / temperature, dim=-1)
        p_t = log_p_t.exp()
        soft = (torch.special.xlogy(p_t, p_t) - p_t * log_p_s).sum(dim=-1).mean() * temperature**2
        total = total + alpha * soft
    return total


def test_objective_hand_computed_and_unchanged():
    # 2 x 3, T = 2 (hand-computed in test_kd.py): T^2 * KL = .70065, CE = .75311
    zs = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    zt = torch.tensor([[3.0, 2.0, 1.0], [1.0, 0.0, 0.0]])
    y = torch.tensor([2, 0])
    objective = DistillObjective(temperature=2.0, alpha=0.5)
    for teacher in (TeacherOutput(logits=zt), TeacherOutput(probs=zt.softmax(dim=1))):
        total, terms = objective(zs, y, teacher)
        assert total.item() == pytest.approx(0.5 * 0.7006471 + 0.5 * 0.7531100, abs=1e-6)
        assert terms["soft"].item() == pytest.approx(0.7006471, abs=1e-6)
        assert terms["ce"].item() == pytest.approx(0.7531100, abs=1e-6)
    torch.manual_seed(0)
    zs, q, zt = torch.randn(6, 5), torch.softmax(torch.randn(6, 5), dim=1), torch.randn(6, 5)
    y = torch.randint(0, 5, (6,))
    for alpha in (0.0, 0.7, 1.0):
        objective = DistillObjective(temperature=3.0, alpha=alpha)
        for teacher in (TeacherOutput(probs=q), TeacherOutput(logits=zt)):
            want = _previous_objective(zs, y, teacher.logits, teacher.probs, 3.0, alpha)
            assert torch.equal(objective(zs, y, teacher)[0], want)


def test_objective_is_kd_plus_weighted_extras():
    torch.manual_seed(0)
    zs, q = torch.randn(6, 5), torch.softmax(torch.randn(6, 5), dim=1)
    y = torch.randint(0, 5, (6,))
    objective = DistillObjective(temperature=3.0, alpha=0.7)
    total, terms = objective(zs, y, TeacherOutput(probs=q))
    torch.testing.assert_close(total, 0.7 * terms["soft"] + 0.3 * terms["ce"])

    hard, hard_terms = DistillObjective(temperature=3.0, alpha=0.0)(zs, y, TeacherOutput())
    assert set(hard_terms) == {"ce"}  # alpha = 0 needs no teacher
    torch.testing.assert_close(hard, nn.functional.cross_entropy(zs, y))

    pairs = feature_pairs({"similarity": 2.0})
    fs, ft = torch.randn(6, 3), torch.randn(6, 7)
    with_extra = build_objective(temperature=3.0, alpha=0.7, losses={"similarity": 2.0}, pairs=pairs,
                                 student_shapes={"pool": fs.shape}, teacher_shapes={"pool": ft.shape})
    total2, terms2 = with_extra(zs, y, TeacherOutput(probs=q, features={"pool": ft}), {"pool": fs})
    torch.testing.assert_close(total2, total + 2.0 * terms2["similarity"])
    with pytest.raises(ValueError, match="no teacher activations captured at 'pool'"):
        with_extra(zs, y, TeacherOutput(probs=q), {"pool": fs})


def test_soft_gradient_through_the_student_does_not_depend_on_t():
    """alpha = 1 with ensemble-style probabilities: the T^2 factor keeps the parameter gradient
    of a linear student at the same size for T = 4, 8, 16 (without it: 16x smaller at T = 16)."""
    torch.manual_seed(1)
    x, q = torch.randn(32, 10), torch.softmax(torch.randn(32, 6), dim=1)
    y = torch.zeros(32, dtype=torch.long)
    norms = {}
    for temperature in (4.0, 8.0, 16.0):
        torch.manual_seed(2)
        student = nn.Linear(10, 6)
        loss, _ = DistillObjective(temperature=temperature, alpha=1.0)(student(x), y, TeacherOutput(probs=q))
        loss.backward()
        norms[temperature] = torch.cat([p.grad.flatten() for p in student.parameters()]).norm().item()
    assert norms[8.0] == pytest.approx(norms[4.0], rel=0.1)
    assert norms[16.0] == pytest.approx(norms[4.0], rel=0.1)


def _problem(n: int = 96):
    torch.manual_seed(3)
    images = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8)
    teacher = _tiny(4, width=0.25).eval()
    with torch.no_grad():
        labels = teacher(images.float() / 255).argmax(dim=1)
    return images, labels, teacher


def _mean_loss(student, objective, teacher_fn, images, labels) -> float:
    student.eval()
    with torch.no_grad():
        total = 0.0
        for batch in iterate_indexed_batches(images, labels, batch_size=32, shuffle=False):
            hooks = {}
            if objective.student_paths:
                with FeatureExtractor(student, objective.student_paths) as extractor:
                    logits = student(batch.x)
                hooks = extractor.features
            else:
                logits = student(batch.x)
            total += float(objective(logits, batch.y, teacher_fn(batch.x, batch.ids), hooks)[0]) * len(batch.y)
    return total / len(labels)


def test_one_epoch_reduces_the_loss_and_trains_the_hint_regressor():
    images, labels, teacher = _problem()
    pairs = feature_pairs({"hint": 1.0}, ["blocks.1", "blocks.1"])
    student = _tiny(5)
    x = images[:4].float() / 255
    objective = build_objective(
        temperature=4.0, alpha=0.9, losses={"hint": 1.0}, pairs=pairs,
        student_shapes=probe_feature_shapes(student, ["blocks.1"], x),
        teacher_shapes=probe_feature_shapes(teacher, ["blocks.1"], x),
    )
    teacher_fn = make_teacher(logits_model=teacher, feature_paths=objective.teacher_paths)
    trained = nn.ModuleDict({"student": student, "objective": objective})
    optimizer = build_optimizer(trained, "adamw", lr=0.01, weight_decay=0.0)
    regressor = objective.extra.terms["hint"].regressor.weight.detach().clone()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}

    before = _mean_loss(student, objective, teacher_fn, images, labels)
    steps = []
    result = distill_one_epoch(
        student, iterate_indexed_batches(images, labels, batch_size=8, shuffle=True, seed=0),
        optimizer, None, objective=objective, teacher=teacher_fn, epoch=0,
        on_step=lambda step, loss: steps.append(step))
    after = _mean_loss(student, objective, teacher_fn, images, labels)

    assert after < before
    assert steps == list(range(12)) and result.examples == 96
    assert set(result.terms) == {"ce", "soft", "hint"} and 0 <= result.accuracy <= 1
    assert not torch.equal(regressor, objective.extra.terms["hint"].regressor.weight)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())
    with pytest.raises(ValueError, match="need a teacher"):
        distill_one_epoch(student, [], optimizer, None, objective=objective, teacher=None, epoch=1)


def test_indexed_batches_follow_iterate_batches():
    images, labels, _ = _problem(20)
    plain = list(iterate_batches(images, labels, batch_size=6, shuffle=True, seed=7, epoch=2))
    indexed = list(iterate_indexed_batches(images, labels, batch_size=6, shuffle=True, seed=7, epoch=2))
    for (x, y), batch in zip(plain, indexed, strict=True):
        torch.testing.assert_close(batch.x, x)
        assert torch.equal(batch.y, y) and torch.equal(labels[batch.ids], y)
        torch.testing.assert_close(images[batch.ids].float() / 255, x)


class _Counting(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x):
        self.calls += 1
        return self.model(x)


def test_teacher_features_come_from_the_probs_pass_or_one_extra_forward():
    _, _, net = _problem(8)
    model = _Counting(net)
    x1, x2 = torch.rand(5, 1, 8, 8), torch.rand(3, 1, 8, 8)

    ensemble_like = make_teacher(probs_fn=lambda x, ids: torch.softmax(model(x), dim=1),
                                 feature_model=model, feature_paths=["model.pool"])
    out = ensemble_like(x1, torch.arange(5))
    assert model.calls == 1 and out.features["model.pool"].shape == (5, net.feature_dim)
    assert out.logits is None and torch.allclose(out.probs.sum(dim=1), torch.ones(5))

    table = torch.softmax(torch.randn(10, 4), dim=1)
    cache_like = make_teacher(probs_fn=lambda x, ids: table[ids], feature_model=model,
                              feature_paths=["model.pool"])
    out = cache_like(x2, torch.tensor([9, 0, 4]))
    assert model.calls == 2 and out.features["model.pool"].shape == (3, net.feature_dim)  # fresh, not x1's
    torch.testing.assert_close(out.probs, table[[9, 0, 4]])

    plain = make_teacher(logits_model=model)
    assert plain(x2, torch.arange(3)).features == {} and model.calls == 3
    with pytest.raises(ValueError, match="exactly one of"):
        make_teacher(logits_model=model, probs_fn=lambda x, ids: x)


def test_feature_pairs_and_bad_losses():
    assert feature_pairs({"rkd": 1.0, "similarity": 0.5}) == {"rkd": (("pool", "pool"),),
                                                              "similarity": (("pool", "pool"),)}
    assert feature_pairs({"hint": 1.0, "rkd": 1.0}, ["blocks.1", "blocks.2"])["rkd"] == (("blocks.1", "blocks.2"),)
    with pytest.raises(ValueError, match="unknown extra loss 'fitnet'; known extra losses: "
                                         "ab, attention, cc, crd, dist, dkd, fsp, ft, hint, irg, nst, pkt, "
                                         "rkd, similarity"):
        feature_pairs({"fitnet": 1.0})
    with pytest.raises(ValueError, match="kd term is always part of the objective"):
        feature_pairs({"kd": 1.0})
    with pytest.raises(ValueError, match="the hint loss compares feature maps"):
        feature_pairs({"hint": 1.0})
    with pytest.raises(ValueError, match=r"\[student module path, teacher module path\]"):
        feature_pairs({"hint": 1.0}, ["blocks.1"])


def test_hint_spatial_mismatch_names_both_shapes_and_paths():
    student, teacher = _tiny(0), _tiny(1, width=0.25)
    x = torch.rand(4, 1, 8, 8)
    s_shapes = probe_feature_shapes(student, ["blocks.1"], x)     # (4, 8, 4, 4)
    t_shapes = probe_feature_shapes(teacher, ["blocks.2"], x)     # (4, 32, 2, 2)
    assert tuple(s_shapes["blocks.1"]) == (4, 8, 4, 4) and tuple(t_shapes["blocks.2"]) == (4, 32, 2, 2)
    pairs = feature_pairs({"hint": 1.0}, ["blocks.1", "blocks.2"])
    with pytest.raises(ValueError) as err:
        build_objective(temperature=2.0, alpha=0.5, losses={"hint": 1.0}, pairs=pairs,
                        student_shapes=s_shapes, teacher_shapes=t_shapes)
    message = str(err.value)
    assert "(4, 8, 4, 4)" in message and "(4, 32, 2, 2)" in message
    assert "student blocks.1" in message and "teacher blocks.2" in message and "spatial" in message
    # channels alone are mapped by the regressor
    same = probe_feature_shapes(teacher, ["blocks.1"], x)
    build_objective(temperature=2.0, alpha=0.5, losses={"hint": 1.0},
                    pairs=feature_pairs({"hint": 1.0}, ["blocks.1", "blocks.1"]),
                    student_shapes=s_shapes, teacher_shapes=same)
    with pytest.raises(ValueError, match="unknown student layer 'blocks.9'.*available: stem, stem.0, "
                                         "stem.1, blocks, blocks.0, blocks.1, blocks.2, pool, pool.0, "
                                         "pool.1, head"):
        probe_feature_shapes(student, ["blocks.9"], x, role="student")


def test_evaluate_predictor_hand_computed():
    # example i has pixel value i; the predictor looks its scores up by that value
    scores = torch.tensor([
        [5.0, 4, 3, 2, 1, 0],   # label 0: top1
        [5.0, 4, 3, 2, 1, 0],   # label 1: top-2
        [5.0, 4, 3, 2, 1, 0],   # label 4: top-5
        [5.0, 4, 3, 2, 1, 0],   # label 5: missed
        [0.0, 1, 2, 3, 4, 5],   # label 5: top1
    ])
    labels = torch.tensor([0, 1, 4, 5, 5])
    images = torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 1, 2, 2).contiguous()

    def predict(x):
        return scores[(x[:, 0, 0, 0] * 255).round().long()]

    result = evaluate_predictor(predict, images, labels, batch_size=2, topk=(1, 2, 5))
    assert result == {"top1": 2 / 5, "top2": 3 / 5, "top5": 4 / 5, "examples": 5.0}
    assert evaluate_predictor(predict, images, labels, topk=(10,))["top10"] == 1.0  # k clipped to K


def test_measure_latency_is_the_per_example_median(monkeypatch):
    """A fake clock that each call advances by a known time: 2 warm-up calls (not timed), then
    5 timed ones of 3, 5, 4, 100 and 4 ms; the median (4 ms) over 2 examples is 2 ms."""
    durations = iter([9.0, 9.0, 0.003, 0.005, 0.004, 0.100, 0.004])
    now = [0.0]
    calls = []

    def slow(x):
        calls.append(x.shape[0])
        now[0] += next(durations)

    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    latency = measure_latency_ms(slow, torch.zeros(2, 1, 4, 4), repeats=5, warmup=2)
    monkeypatch.undo()
    assert calls == [2] * 7
    assert latency == pytest.approx(2.0)
    with pytest.raises(ValueError, match="example must be"):
        measure_latency_ms(slow, torch.zeros(4, 4))
    with pytest.raises(ValueError, match="repeats >= 1"):
        measure_latency_ms(slow, torch.zeros(1, 1, 4, 4), repeats=0)
