"""The objective's terms: which layers each names, what each is fed, how each is sized."""

from __future__ import annotations

import pytest
import torch

from distill import dkd_loss, fsp_loss, nst_loss
from distill.objective import (
    DistillObjective,
    TeacherOutput,
    build_objective,
    feature_pairs,
    pair_paths,
    prepare_objective,
    term_kind,
)
from distill.train import IndexedBatch


def test_layers_come_from_the_term_then_the_shared_pair_then_the_default():
    pairs = feature_pairs(
        {"dkd": 1.0, "fsp": 1.0, "nst": 1.0, "pkt": 1.0, "irg": 1.0, "hint:a": 1.0, "hint:b": 1.0},
        ["blocks.2", "blocks.2"],
        term_layers={"fsp": [["blocks.0", "blocks.0"], ["blocks.1", "blocks.1"]], "hint:a": ["blocks.1", "blocks.0"]},
    )
    assert pairs == {"dkd": (), "fsp": (("blocks.0", "blocks.0"), ("blocks.1", "blocks.1")),
                     "nst": (("blocks.2", "blocks.2"),), "pkt": (("blocks.2", "blocks.2"),),
                     "irg": (("blocks.2", "blocks.2"),), "hint:a": (("blocks.1", "blocks.0"),),
                     "hint:b": (("blocks.2", "blocks.2"),)}
    assert feature_pairs({"pkt": 1.0, "irg": 1.0, "crd": 1.0}) == {
        "pkt": (("pool", "pool"),), "irg": (("head", "head"),), "crd": (("pool", "pool"),)}
    assert pair_paths(pairs) == (("blocks.0", "blocks.1", "blocks.2"), ("blocks.0", "blocks.1", "blocks.2"))
    assert term_kind("hint:a").inputs == "features" and term_kind("dist").inputs == "logits"
    assert term_kind("crd").uses_ids and term_kind("fsp").multi_layer and term_kind("ft").needs_fit


def test_malformed_layers_are_refused():
    with pytest.raises(ValueError, match="fsp loss relates two or more layers"):
        feature_pairs({"fsp": 1.0}, ["blocks.1", "blocks.1"])
    with pytest.raises(ValueError, match=r"the fsp loss compares feature maps.*\[\[blocks.0, blocks.0\]"):
        feature_pairs({"fsp": 1.0})
    with pytest.raises(ValueError, match="nst loss takes one .* pair.*nst:a, nst:b"):
        feature_pairs({"nst": 1.0}, term_layers={"nst": [["a", "b"], ["c", "d"]]})
    with pytest.raises(ValueError, match="dkd loss compares the models' predictions; it takes no layers"):
        feature_pairs({"dkd": 1.0}, term_layers={"dkd": ["a", "b"]})
    with pytest.raises(ValueError, match="layers of ab must be"):
        feature_pairs({"ab": 1.0}, term_layers={"ab": ["a", "b", "c"]})
    with pytest.raises(ValueError, match=r"layers are given for terms \['nst'\] that are not among"):
        feature_pairs({"ab": 1.0}, ["a", "b"], term_layers={"nst": ["a", "b"]})
    with pytest.raises(ValueError, match=r"options are given for terms \['crd'\]"):
        build_objective(temperature=1.0, alpha=0.5, losses={}, options={"crd": {}})


def _shapes():
    student = {"s1": torch.Size([4, 4, 8, 8]), "s2": torch.Size([4, 6, 4, 4]), "pool": torch.Size([4, 6])}
    teacher = {"t1": torch.Size([4, 4, 8, 8]), "t2": torch.Size([4, 6, 4, 4]), "pool": torch.Size([4, 10])}
    return student, teacher


def test_each_term_gets_what_it_compares():
    losses = {"dkd": 1.0, "fsp": 2.0, "nst:x": 0.5, "crd": 0.1}
    pairs = feature_pairs(losses, term_layers={"fsp": [["s1", "t1"], ["s2", "t2"]], "nst:x": ["s2", "t2"]})
    student_shapes, teacher_shapes = _shapes()
    objective = build_objective(temperature=2.0, alpha=0.0, losses=losses, pairs=pairs,
                                student_shapes=student_shapes, teacher_shapes=teacher_shapes,
                                options={"dkd": {"beta": 2.0}, "crd": {"negatives": 3}}, num_examples=12)
    crd = objective.extra.term_module("crd")
    assert crd.memory_size == 12 and crd.negatives == 3 and crd.embed_s.in_features == 6
    torch.manual_seed(0)
    fs = {p: torch.randn(4, *s[1:]) for p, s in student_shapes.items()}
    ft = {p: torch.randn(4, *s[1:]) for p, s in teacher_shapes.items()}
    zs, q, y = torch.randn(4, 5), torch.softmax(torch.randn(4, 5), 1), torch.tensor([0, 1, 2, 3])
    total, terms = objective(zs, y, TeacherOutput(probs=q, features=ft), fs, torch.arange(4))
    assert set(terms) == {"ce", "dkd", "fsp", "nst:x", "crd"}
    torch.testing.assert_close(terms["dkd"], dkd_loss(zs, y, teacher_probs=q, beta=2.0, temperature=4.0))
    torch.testing.assert_close(terms["fsp"], fsp_loss([fs["s1"], fs["s2"]], [ft["t1"], ft["t2"]]))
    torch.testing.assert_close(terms["nst:x"], nst_loss(fs["s2"], ft["t2"]))
    weighted = terms["ce"] + terms["dkd"] + 2 * terms["fsp"] + 0.5 * terms["nst:x"] + 0.1 * terms["crd"]
    torch.testing.assert_close(total, weighted)
    with pytest.raises(ValueError, match="crd term needs the batch's example ids"):
        objective(zs, y, TeacherOutput(probs=q, features=ft), fs)


def test_building_leaves_no_trace_of_the_random_check():
    """The build-time check runs on a copy: the bank, its normalisers and BN statistics stay untouched."""
    losses = {"crd": 1.0, "ab": 1.0}
    pairs = feature_pairs(losses, term_layers={"ab": ["s2", "t2"]})
    student_shapes, teacher_shapes = _shapes()
    torch.manual_seed(1)
    objective = build_objective(temperature=2.0, alpha=0.5, losses=losses, pairs=pairs, student_shapes=student_shapes,
                                teacher_shapes=teacher_shapes, num_examples=30)
    assert (objective.extra.term_module("crd").normalizers < 0).all()
    bn = objective.extra.term_module("ab").connector[1]
    assert int(bn.num_batches_tracked) == 0 and torch.equal(bn.running_mean, torch.zeros(6))


def test_prepare_objective_fits_factor_transfer_on_teacher_maps():
    losses = {"ft": 1.0}
    pairs = feature_pairs(losses, term_layers={"ft": ["s2", "t2"]})
    student_shapes, teacher_shapes = _shapes()
    objective = build_objective(temperature=2.0, alpha=0.5, losses=losses, pairs=pairs, student_shapes=student_shapes,
                                teacher_shapes=teacher_shapes, options={"ft": {"paraphraser_epochs": 2}})
    torch.manual_seed(2)
    maps = torch.relu(torch.randn(8, 6, 4, 4))
    seen = []

    def teacher(x, ids):
        seen.append(ids.tolist())
        return TeacherOutput(logits=torch.zeros(len(ids), 3), features={"t2": maps[ids]})

    def batches(epoch):
        return [IndexedBatch(torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.long), torch.arange(4) + 4 * b)
                for b in range(2)]

    history = prepare_objective(objective, batches, teacher)
    assert list(history) == ["ft"] and len(history["ft"]) == 2 and seen == [[0, 1, 2, 3], [4, 5, 6, 7]] * 2
    assert prepare_objective(DistillObjective(temperature=1.0, alpha=0.5), batches, teacher) == {}
