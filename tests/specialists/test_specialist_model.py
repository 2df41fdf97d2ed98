"""Tests for specialists.model: init invariance, fine-tuning modes, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from generalist.models import create_model
from specialists.model import (
    Specialist,
    build_specialist,
    collapse_probs,
    reinitialise_trailing,
    trainable_parameters,
    validate_group,
)

K = 10


class Block(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)
        self.bn = nn.BatchNorm2d(ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn(self.conv(x)))


class TinyClassifier(nn.Module):
    """Follows the generalist.models.Classifier contract: stem -> blocks -> pool -> head."""

    def __init__(self, num_classes: int = K, ch: int = 6, n_blocks: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, ch, 3, padding=1), nn.BatchNorm2d(ch), nn.ReLU())
        self.blocks = nn.Sequential(*[Block(ch) for _ in range(n_blocks)])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(ch, num_classes)
        self.feature_dim = ch

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.blocks(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def make_generalist(seed: int = 0) -> TinyClassifier:
    """Non-trivial weights: spread-out logits, non-zero bias, non-default BN statistics."""
    torch.manual_seed(seed)
    model = TinyClassifier()
    with torch.no_grad():
        model.head.weight.mul_(8.0)
        model.head.bias.normal_(0.0, 2.0)
        model.train()
        for _ in range(3):
            model(torch.randn(16, 1, 8, 8) * 2.0 + 0.5)
    return model.eval()


def max_invariant_diff(gen: nn.Module, spec: Specialist, x: torch.Tensor) -> float:
    with torch.no_grad():
        p_gen = collapse_probs(torch.softmax(gen(x), dim=1), spec.group)
        p_spec = torch.softmax(spec(x), dim=1)
    return float((p_gen - p_spec).abs().max())


@pytest.mark.parametrize("group", [(7, 2, 5), (3,), (0, 9), tuple(range(1, K))])
@pytest.mark.parametrize("finetune", ["all", "head", "last_n"])
def test_init_matches_collapsed_generalist(group: tuple[int, ...], finetune: str) -> None:
    gen = make_generalist()
    spec = build_specialist(gen, group, finetune=finetune, last_n=2).eval()
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 3.0
    assert max_invariant_diff(gen, spec, x) <= 1e-5
    # The generalist is not degenerate: its probabilities really vary and the dustbin matters.
    with torch.no_grad():
        p = torch.softmax(gen(x), dim=1)
    assert float(p.max(dim=1).values.min()) < 0.9
    assert float(p.max()) > 0.5


def test_output_order_shape_and_attributes() -> None:
    gen = make_generalist()
    spec = build_specialist(gen, [7, 2, 5])
    assert isinstance(spec, Specialist)
    assert spec.group == (7, 2, 5)
    assert spec.dustbin_index == 3
    assert spec.out_classes == (0, 1, 3, 4, 6, 8, 9)
    assert spec.dustbin_bias.shape == () and float(spec.dustbin_bias.detach()) == 0.0
    assert spec.prior_correction is None
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    spec.eval()
    with torch.no_grad():
        logits = spec(x)
        g = gen(x)
        feats = spec.forward_features(x)
        assert logits.shape == (5, 4)
        # Group logits are the generalist's logits for classes 7, 2, 5, in that order.
        torch.testing.assert_close(logits[:, :3], g[:, [7, 2, 5]], atol=1e-5, rtol=0)
        # Dustbin logit is logsumexp of the other classes.
        torch.testing.assert_close(logits[:, 3], torch.logsumexp(g[:, list(spec.out_classes)], 1),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(spec.head_logits(feats), logits, atol=0, rtol=0)
        torch.testing.assert_close(feats, gen.forward_features(x), atol=0, rtol=0)


def test_dustbin_bias_shifts_only_dustbin_logit() -> None:
    spec = build_specialist(make_generalist(), (4, 1)).eval()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = spec(x)
        spec.dustbin_bias.fill_(1.5)
        after = spec(x)
    torch.testing.assert_close(after[:, :2], before[:, :2], atol=0, rtol=0)
    torch.testing.assert_close(after[:, 2], before[:, 2] + 1.5, atol=1e-6, rtol=0)


def test_collapse_probs_hand_values() -> None:
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    out = collapse_probs(p, [2, 0])
    expected = torch.tensor([[0.3, 0.1, 0.6], [0.25, 0.25, 0.5]])
    torch.testing.assert_close(out, expected, atol=1e-7, rtol=0)


def test_specialist_is_a_deep_copy() -> None:
    gen = make_generalist()
    spec = build_specialist(gen, (1, 2))
    with torch.no_grad():
        spec.trunk.stem[0].weight.add_(1.0)
        spec.head.weight.add_(1.0)
    assert not torch.equal(spec.trunk.stem[0].weight, gen.stem[0].weight)
    assert not torch.equal(spec.head.weight, gen.head.weight[[1, 2]])
    assert isinstance(gen.head, nn.Linear)  # generalist untouched


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def one_step(spec: Specialist, image_size: int = 8) -> None:
    spec.train()
    opt = torch.optim.SGD(trainable_parameters(spec), lr=0.5, momentum=0.9, weight_decay=1e-2)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, 1, image_size, image_size, generator=g) * 2.0 + 1.0
    y = torch.randint(0, spec.dustbin_index + 1, (8,), generator=g)
    loss = nn.functional.cross_entropy(spec(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], prefix: str) -> bool:
    keys = [k for k in before if k.startswith(prefix) and before[k].is_floating_point()]
    assert keys, prefix
    return any(not torch.equal(before[k], after[k]) for k in keys)


def test_finetune_head_freezes_trunk_and_bn_stats() -> None:
    gen = make_generalist()
    spec = build_specialist(gen, (3, 8), finetune="head")
    assert spec.trunk_frozen
    n_trainable = sum(p.numel() for p in trainable_parameters(spec))
    assert n_trainable == 2 * (6 + 1) + 1  # head rows + bias, plus the dustbin bias
    before = snapshot(spec)
    one_step(spec)
    after = snapshot(spec)
    assert not changed(before, after, "trunk.")  # weights AND BN running stats
    assert changed(before, after, "head.")
    assert not torch.equal(before["dustbin_bias"], after["dustbin_bias"])
    assert torch.equal(before["out_weight"], after["out_weight"])  # frozen out-rows
    assert not spec.trunk.training and spec.training and spec.head.training
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():  # trunk still identical to the generalist's: shareable
        torch.testing.assert_close(spec.forward_features(x), gen.eval().forward_features(x),
                                   atol=0, rtol=0)


def test_finetune_last_n_trains_only_last_blocks() -> None:
    spec = build_specialist(make_generalist(), (3, 8), finetune="last_n", last_n=1)
    before = snapshot(spec)
    one_step(spec)
    after = snapshot(spec)
    assert not changed(before, after, "trunk.stem.")
    assert not changed(before, after, "trunk.blocks.0.")
    assert not changed(before, after, "trunk.blocks.1.")
    assert changed(before, after, "trunk.blocks.2.conv.")
    assert not torch.equal(before["trunk.blocks.2.bn.running_mean"],
                           after["trunk.blocks.2.bn.running_mean"])  # trainable block: BN updates
    assert changed(before, after, "head.")
    assert not spec.trunk.stem.training and not spec.trunk.blocks[1].training
    assert spec.trunk.blocks[2].training


def test_finetune_all_trains_everything_and_eval_mode_works() -> None:
    spec = build_specialist(make_generalist(), (3, 8), finetune="all")
    assert len(trainable_parameters(spec)) == len([p for p in spec.parameters()])
    before = snapshot(spec)
    one_step(spec)
    after = snapshot(spec)
    assert changed(before, after, "trunk.stem.")
    assert not torch.equal(before["trunk.stem.1.running_mean"], after["trunk.stem.1.running_mean"])
    spec.eval()
    assert not any(m.training for m in spec.modules())


def test_train_out_rows_option() -> None:
    gen = make_generalist()
    spec = build_specialist(gen, (0,), finetune="head", train_out_rows=True).eval()
    assert isinstance(spec.out_weight, nn.Parameter)
    assert any(p is spec.out_weight for p in trainable_parameters(spec))
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    assert max_invariant_diff(gen, spec, x) <= 1e-5


@pytest.mark.parametrize(
    ("group", "kwargs", "match"),
    [
        ([], {}, "group is empty"),
        ([1, 2, 1], {}, "duplicate class ids \\[1\\]"),
        ([3, 10], {}, "out of range"),
        ([-1], {}, "negative"),
        ([1.5], {}, "integer class ids"),
        (list(range(K)), {}, "non-empty dustbin"),
        ([1], {"finetune": "partial"}, "unknown finetune mode"),
        ([1], {"finetune": "last_n", "last_n": 0}, "1 <= last_n <= 3"),
        ([1], {"finetune": "last_n", "last_n": 4}, "1 <= last_n <= 3"),
    ],
)
def test_validation_errors(group: list, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_specialist(make_generalist(), group, **kwargs)


def test_bad_generalist_and_features() -> None:
    with pytest.raises(ValueError, match="head"):
        build_specialist(nn.Sequential(nn.Linear(3, 3)), [0])
    spec = build_specialist(make_generalist(), [0])
    with pytest.raises(ValueError, match=r"shape \(B, 6\)"):
        spec.head_logits(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="out of range"):
        collapse_probs(torch.full((1, 3), 1 / 3), [3])


def test_validate_group_accepts_numpy_and_tensor_ids() -> None:
    assert validate_group(np.array([5, 1])) == (5, 1)
    assert validate_group(torch.tensor([2, 0]), num_classes=3) == (2, 0)


def test_with_generalist_create_model() -> None:
    torch.manual_seed(0)
    gen = create_model("cnn", num_classes=12, in_channels=1, image_size=16)
    with torch.no_grad():
        gen.head.weight.mul_(5.0)
        gen.head.bias.normal_(0.0, 1.0)
    gen.eval()
    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(7))
    for group, finetune in [((11, 0, 4), "head"), ((6,), "all"), ((2, 3), "last_n")]:
        spec = build_specialist(gen, group, finetune=finetune).eval()
        assert spec(x).shape == (8, len(group) + 1)
        assert max_invariant_diff(gen, spec, x) <= 1e-5
    spec = build_specialist(gen, (1, 5), finetune="last_n", last_n=len(gen.blocks))
    before = snapshot(spec)
    one_step(spec, image_size=16)
    after = snapshot(spec)
    assert not changed(before, after, "trunk.stem.")
    assert changed(before, after, "trunk.blocks.0.")


def test_reinitialise_trailing_starts_the_last_blocks_and_head_afresh() -> None:
    gen = make_generalist()
    spec = build_specialist(gen, [2, 5, 7], train_out_rows=True)
    before = snapshot(spec)
    torch.manual_seed(3)
    reinitialise_trailing(spec, 1)
    after = snapshot(spec)
    assert not any(changed(before, after, p) for p in ("trunk.stem.", "trunk.blocks.0.", "trunk.blocks.1."))
    assert changed(before, after, "trunk.blocks.2.")
    assert changed(before, after, "head.") and changed(before, after, "out_weight")
    assert torch.equal(spec.trunk.blocks[2].bn.running_var, torch.ones(6))  # running statistics reset
    assert float(spec.dustbin_bias.detach()) == 0.0 and spec.out_weight.requires_grad
    # seeded: the same seed gives the same specialist, another seed another one
    fresh = ("trunk.blocks.2.", "head.", "out_weight", "out_bias")
    again = build_specialist(gen, [2, 5, 7], train_out_rows=True)
    torch.manual_seed(3)
    same = snapshot(reinitialise_trailing(again, 1))
    assert not any(changed(after, same, prefix) for prefix in fresh)
    other = build_specialist(gen, [2, 5, 7], train_out_rows=True)
    torch.manual_seed(4)
    assert changed(after, snapshot(reinitialise_trailing(other, 1)), "trunk.blocks.2.")
    x = torch.rand(4, 1, 8, 8)
    assert spec(x).shape == (4, 4)


@pytest.mark.parametrize(("kwargs", "blocks", "match"), [
    ({"train_out_rows": False}, 1, "trainable out-rows"),
    ({"train_out_rows": True}, 4, r"out of range.*1 <= reinit_blocks <= 3"),
    ({"train_out_rows": True, "finetune": "head"}, 1, "frozen under finetune='head'"),
    ({"train_out_rows": True, "finetune": "last_n", "last_n": 1}, 2, "frozen under finetune='last_n'"),
])
def test_reinitialise_trailing_refuses_what_cannot_train(kwargs: dict, blocks: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        reinitialise_trailing(build_specialist(make_generalist(), [1, 2], **kwargs), blocks)
