"""Routed ensemble inference, its soft targets and the paper's evaluation
(specialists/ensemble/routed_ensemble.py, soft_targets.py, evaluation.py)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from generalist.models import create_model
from specialists.ensemble import (
    GroupMembership,
    active_specialists,
    build_ensemble,
    combine_routed,
    ensemble_forward,
    ensemble_forward_at,
    ensemble_soft_targets,
    evaluate_predictions,
    route,
    shares_trunk,
    solve_fixed_point,
    specialist_outputs,
)
from specialists.model import build_specialist

K = 7
GROUPS = ((1, 2, 3), (3, 4), (5, 6, 0))  # overlapping: class 3 is in two groups


def _generalist(seed: int = 0):
    torch.manual_seed(seed)
    model = create_model("cnn", num_classes=K, in_channels=1, image_size=8, width=0.25).eval()
    _perturb(model.head, seed=seed + 100, scale=3.0)  # varied top-1 classes across inputs
    return model


def _perturb(module: torch.nn.Module, seed: int, scale: float = 0.5) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def _specialists(generalist, finetune: str, groups=GROUPS):
    out = []
    for m, group in enumerate(groups):
        spec = build_specialist(generalist, group, finetune=finetune)
        _perturb(spec.head, seed=10 + m)
        with torch.no_grad():
            spec.dustbin_bias.fill_(0.3 * (m - 1))
        if finetune != "head":
            _perturb(spec.trunk, seed=20 + m, scale=0.05)
        out.append(spec.eval())
    return out


def _images(n: int = 24, seed: int = 1):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _count_rows(spec, counter: list[int]):
    return spec.trunk.stem.register_forward_hook(lambda mod, inp, out: counter.append(inp[0].shape[0]))


@pytest.mark.parametrize("top_n", [1, 2])
def test_routed_equals_running_every_specialist_on_every_example(top_n):
    generalist = _generalist()
    specs = _specialists(generalist, "all")
    ensemble = build_ensemble(generalist, specs, top_n=top_n)
    assert not ensemble.shared_trunk
    x = _images()
    seen = [[] for _ in specs]
    hooks = [_count_rows(s, c) for s, c in zip(specs, seen, strict=True)]
    out = ensemble_forward(ensemble, x)
    for h in hooks:
        h.remove()

    with torch.no_grad():
        p_general = torch.softmax(generalist(x).double(), dim=1)
        dense = [torch.softmax(s(x).double(), dim=1) for s in specs]  # every specialist, every row
    active = active_specialists(p_general, ensemble.membership, top_n)
    routed = [(index, probs[index]) for index, probs in zip(route(active), dense, strict=True)]
    q_ref, _ = solve_fixed_point(p_general, routed, active, ensemble.membership, tol=1e-10)
    assert torch.equal(out.active, active)
    assert 0 < int(active.sum()) < active.numel(), "the case must mix active and inactive pairs"
    assert [sum(c) for c in seen] == active.sum(dim=0).tolist(), "specialists ran on inactive rows"
    torch.testing.assert_close(out.q, q_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.q.sum(dim=1), torch.ones(len(x), dtype=torch.float64))
    assert out.info["converged"]
    changed = active.any(dim=1)
    assert (out.q[changed] - p_general[changed]).abs().amax() > 1e-3, "specialists must matter here"


def test_forward_at_several_temperatures_runs_the_models_once_and_equals_one_forward_each():
    generalist = _generalist()
    specs = _specialists(generalist, "all")
    ensemble = build_ensemble(generalist, specs, top_n=2)
    x = _images()
    temperatures = (1.0, 1.5, 3.0)
    seen = [[] for _ in specs]
    hooks = [_count_rows(s, c) for s, c in zip(specs, seen, strict=True)]
    outs = ensemble_forward_at(ensemble, x, temperatures)
    for h in hooks:
        h.remove()
    assert [sum(c) for c in seen] == outs[0].active.sum(dim=0).tolist(), "each specialist runs once"
    for t, out in zip(temperatures, outs, strict=True):
        one = ensemble_forward(replace(ensemble, specialist_temperature=t), x)
        assert torch.equal(out.q, one.q) and torch.equal(out.active, one.active)
    assert (outs[0].q - outs[2].q).abs().amax() > 1e-3, "the temperature must matter here"


def test_no_active_specialist_gives_the_generalist():
    generalist = _generalist()
    with torch.no_grad():
        generalist.head.bias[0] += 50.0  # top-1 is class 0 for every input
    groups = ((1, 2), (3, 4, 5))
    specs = _specialists(generalist, "all", groups)
    ensemble = build_ensemble(generalist, specs)
    seen: list[int] = []
    hooks = [_count_rows(s, seen) for s in specs]
    x = _images()
    out = ensemble_forward(ensemble, x)
    for h in hooks:
        h.remove()
    assert not bool(out.active.any()) and seen == []
    with torch.no_grad():
        p_general = torch.softmax(generalist(x).double(), dim=1)
    assert torch.equal(out.q, p_general)


def test_shared_trunk_path_equals_the_full_path_for_head_specialists():
    generalist = _generalist()
    specs = _specialists(generalist, "head")
    assert all(shares_trunk(generalist, s) for s in specs)
    shared = build_ensemble(generalist, specs, top_n=2)
    full = build_ensemble(generalist, specs, top_n=2, share_trunk=False)
    assert shared.shared_trunk and not full.shared_trunk
    x = _images(32, seed=3)
    calls: list[int] = []
    hooks = [_count_rows(s, calls) for s in specs]
    q_shared = ensemble_forward(shared, x).q
    assert calls == [], "the shared path must not run the specialists' trunks"
    q_full = ensemble_forward(full, x).q
    for h in hooks:
        h.remove()
    torch.testing.assert_close(q_shared, q_full, atol=1e-6, rtol=0)


def test_shared_trunk_is_not_assumed_when_trunks_differ():
    generalist = _generalist()
    specs = _specialists(generalist, "all")
    assert not any(shares_trunk(generalist, s) for s in specs)
    head_specs = _specialists(generalist, "head")
    _perturb(head_specs[0].trunk, seed=5, scale=0.01)  # same mode, different weights
    assert not shares_trunk(generalist, head_specs[0])
    with pytest.raises(ValueError, match="finetune='head'"):
        build_ensemble(generalist, head_specs, share_trunk=True)


def test_specialist_outputs_are_routed_pairs():
    generalist = _generalist()
    specs = _specialists(generalist, "all")
    ensemble = build_ensemble(generalist, specs)
    x = _images(6)
    active = torch.zeros(6, len(specs), dtype=torch.bool)
    active[[1, 4], 0] = True
    active[2, 2] = True
    routed = specialist_outputs(ensemble, x, active)
    assert [idx.tolist() for idx, _ in routed] == [[1, 4], [], [2]]
    assert [tuple(p.shape) for _, p in routed] == [(2, 4), (0, 3), (1, 4)]
    with torch.no_grad():
        expected = torch.softmax(specs[0](x[[1, 4]]).double(), dim=1)
    torch.testing.assert_close(routed[0][1], expected)


def test_soft_targets_soften_q_in_batches_of_any_size():
    generalist = _generalist()
    ensemble = build_ensemble(generalist, _specialists(generalist, "all"), top_n=2)
    x = _images(10)
    q = ensemble_forward(ensemble, x).q  # (10, K) float64
    torch.testing.assert_close(ensemble_soft_targets(ensemble, x, batch_size=3), q, atol=1e-6, rtol=0)
    hot = ensemble_soft_targets(ensemble, x, 2.0, batch_size=4)  # softmax(log q / 2) = sqrt(q), renormalised
    expected = q.sqrt() / q.sqrt().sum(dim=1, keepdim=True)
    assert hot.dtype == torch.float64 and hot.device.type == "cpu"
    torch.testing.assert_close(hot, expected, atol=1e-6, rtol=0)
    assert ensemble_soft_targets(ensemble, x[:0]).shape == (0, K)
    calls: list[int] = []
    hook = generalist.register_forward_hook(lambda mod, inp, out: calls.append(1))
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        ensemble_soft_targets(ensemble, x, 0.0)
    hook.remove()
    assert calls == [], "the temperature is checked before any model runs"


# ------------------------------------------------------------------------------ bad input
def test_membership_of_the_wrong_shape_is_refused():
    generalist = _generalist()
    specs = _specialists(generalist, "all")
    with pytest.raises(ValueError, match="membership has K=9 classes but the generalist predicts 7"):
        build_ensemble(generalist, specs, GroupMembership.from_groups(GROUPS, 9))
    with pytest.raises(ValueError, match="2 groups .* but there are 3 specialists"):
        build_ensemble(generalist, specs, GroupMembership.from_groups(GROUPS[:2], K))
    swapped = GroupMembership.from_groups((GROUPS[1], GROUPS[0], GROUPS[2]), K)
    with pytest.raises(ValueError, match="membership group 0 is \\[3, 4\\]"):
        build_ensemble(generalist, specs, swapped)


def test_nan_or_unnormalised_probabilities_are_refused():
    generalist = _generalist()
    specs = _specialists(generalist, "all")
    ensemble = build_ensemble(generalist, specs)
    x = _images(8)
    with torch.no_grad():
        p_general = torch.softmax(generalist(x).double(), dim=1)
    active = active_specialists(p_general, ensemble.membership, 1)
    routed = specialist_outputs(ensemble, x, active)
    with pytest.raises(ValueError, match="do not sum to 1"):
        combine_routed(ensemble, p_general * 0.9, routed)
    m = next(i for i, (idx, _) in enumerate(routed) if idx.numel())
    bad = list(routed)
    bad[m] = (routed[m][0], routed[m][1].clone().fill_(float("nan")))
    with pytest.raises(ValueError, match=f"specialist_probs\\[{m}\\] has NaN"):
        combine_routed(ensemble, p_general, bad, active)
    with torch.no_grad():
        generalist.head.bias[0] = float("nan")  # a broken model, through the forward entry point
    with pytest.raises(ValueError, match="p_general has NaN"):
        ensemble_forward(build_ensemble(generalist, specs), x)


# ------------------------------------------------------------------------------ evaluation
def test_evaluation_and_table4_on_a_hand_made_case():
    # K = 5, groups {1, 2} and {2, 3}: coverage of classes 0..4 = 0, 1, 2, 1, 0.
    membership = GroupMembership.from_groups([(1, 2), (2, 3)], 5)
    labels = torch.tensor([0, 4, 0, 1, 1, 3, 3, 2, 2, 2])
    general = torch.tensor([0, 0, 0, 1, 2, 1, 3, 2, 3, 3])  # correct: 1 0 1 1 0 0 1 1 0 0 -> 5
    ensemble = torch.tensor([0, 0, 1, 1, 1, 3, 3, 2, 2, 3])  # correct: 1 0 0 1 1 1 1 1 1 0 -> 7
    report = evaluate_predictions(labels, general, ensemble, membership)
    assert report["n_examples"] == 10
    assert report["generalist_top1"] == pytest.approx(0.5)
    assert report["ensemble_top1"] == pytest.approx(0.7)
    assert report["n_covered"] == 7  # labels 1, 1, 3, 3, 2, 2, 2
    assert report["covered_generalist_top1"] == pytest.approx(3 / 7)
    assert report["covered_ensemble_top1"] == pytest.approx(6 / 7)
    table = {r["specialists_covering"]: r for r in report["table4"]}
    assert sorted(table) == [0, 1, 2]
    assert [table[k]["n_examples"] for k in (0, 1, 2)] == [3, 4, 3]
    assert [table[k]["generalist_correct"] for k in (0, 1, 2)] == [2, 2, 1]
    assert [table[k]["ensemble_correct"] for k in (0, 1, 2)] == [1, 4, 2]
    assert [table[k]["delta_correct"] for k in (0, 1, 2)] == [-1, 2, 1]
    assert table[0]["relative_accuracy_change"] == pytest.approx(-0.5)
    assert table[1]["relative_accuracy_change"] == pytest.approx(1.0)
    assert table[2]["relative_accuracy_change"] == pytest.approx(1.0)
    # group {1, 2}: labels 1, 1, 2, 2, 2 (gen right 2 of 5, ensemble 4); {2, 3}: labels 3, 3, 2, 2, 2
    groups = report["per_group"]
    assert [g["n_examples"] for g in groups] == [5, 5]
    assert groups[0]["generalist_top1"] == pytest.approx(2 / 5) and groups[0]["ensemble_top1"] == pytest.approx(4 / 5)
    assert groups[1]["generalist_top1"] == pytest.approx(2 / 5) and groups[1]["ensemble_top1"] == pytest.approx(4 / 5)


def test_evaluation_edge_cases():
    membership = GroupMembership.from_groups([(1, 2)], 4)
    report = evaluate_predictions(torch.tensor([0, 3]), torch.tensor([1, 1]), torch.tensor([0, 1]), membership)
    assert report["n_covered"] == 0 and math.isnan(report["covered_ensemble_top1"])
    (row,) = report["table4"]
    assert row["n_examples"] == 2 and row["relative_accuracy_change"] is None  # generalist got 0 right
    with pytest.raises(ValueError, match="must all be \\(N,\\)"):
        evaluate_predictions(torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([0, 1]), membership)
    with pytest.raises(ValueError, match="labels must lie in \\[0, 4\\)"):
        evaluate_predictions(torch.tensor([5]), torch.tensor([0]), torch.tensor([0]), membership)
