"""Tests for the generalist model registry (generalist.models)."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from generalist.models import (
    Classifier,
    ModelSummary,
    Normalize,
    count_parameters,
    create_model,
    list_models,
    register_model,
    summarize_model,
)
from generalist.models.registry import MODELS


def conv_bn(cin: int, cout: int) -> int:
    """Hand count of a bias-free 3x3 conv followed by BatchNorm (weight + bias)."""
    return 9 * cin * cout + 2 * cout


def check_contract(model: Classifier, batch: int, channels: int, size: int, classes: int) -> None:
    torch.manual_seed(0)
    x = torch.rand(batch, channels, size, size)  # (B, C, H, W)
    model.eval()
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
        via_head = model.head(features)
    assert logits.shape == (batch, classes)
    assert features.shape == (batch, model.feature_dim)
    assert isinstance(model.head, nn.Linear)
    assert (model.head.in_features, model.head.out_features) == (model.feature_dim, classes)
    assert isinstance(model.blocks, nn.Sequential) and len(model.blocks) >= 2
    assert isinstance(model.stem[0], Normalize)
    torch.testing.assert_close(logits, via_head, rtol=0, atol=0)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["cnn", "cnn_fast", "resnet", "resnet_cifar"])
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32)])
def test_own_families_satisfy_contract(name: str, channels: int, size: int) -> None:
    model = create_model(name, num_classes=7, in_channels=channels, image_size=size, width=0.5)
    check_contract(model, batch=3, channels=channels, size=size, classes=7)


@pytest.mark.parametrize("name", ["tv.resnet18", "tv.mobilenet_v3_small"])
def test_torchvision_models_grayscale_32px(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=11, in_channels=1, image_size=32)
    check_contract(model, batch=2, channels=1, size=32, classes=11)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 1
    expected_dim = {"tv.resnet18": 512, "tv.mobilenet_v3_small": 1024}[name]
    assert model.feature_dim == expected_dim
    # trains: gradients reach the adapted first conv
    model.train()
    loss = nn.functional.cross_entropy(model(torch.rand(4, 1, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "shufflenet_v2_x0_5", "densenet121"])
def test_torchvision_wrapper_computes_the_original_function(name: str) -> None:
    torch.manual_seed(0)
    original = torchvision.models.get_model(name, weights=None, num_classes=5).eval()
    torch.manual_seed(0)  # same construction, same initial weights
    wrapped = create_model(f"tv.{name}", num_classes=5, in_channels=3).eval()
    assert count_parameters(wrapped) == count_parameters(original)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), original((x - 0.5) / 0.5))


def test_torchvision_rejects_width_and_unsupported_names() -> None:
    with pytest.raises(ValueError, match="fixed architecture"):
        create_model("tv.resnet18", num_classes=3, width=0.5)
    with pytest.raises(ValueError, match=r"unknown model 'tv.vit_b_16'; did you mean 'tv\."):
        create_model("tv.vit_b_16", num_classes=3)


def test_tiny_cnn_parameter_count_matches_hand_count() -> None:
    # channels (32, 64, 128) * 0.125 = (4, 8, 16); convs per stage round(2 * 0.5) = 1
    model = create_model("cnn", num_classes=5, in_channels=2, width=0.125, depth=0.5)
    stem = conv_bn(2, 4)
    stages = conv_bn(4, 4) + conv_bn(4, 8) + conv_bn(8, 16)
    head = 16 * 5 + 5
    assert stem + stages + head == 1805
    assert count_parameters(model) == 1805
    assert model.feature_dim == 16


def test_default_cnn_and_resnet_parameter_counts() -> None:
    cnn = create_model("cnn", num_classes=400, in_channels=1)
    hand_cnn = (
        conv_bn(1, 32)
        + 2 * conv_bn(32, 32)
        + conv_bn(32, 64)
        + conv_bn(64, 64)
        + conv_bn(64, 128)
        + conv_bn(128, 128)
        + 128 * 400
        + 400
    )
    assert count_parameters(cnn) == hand_cnn == 347_760
    resnet = create_model("resnet", num_classes=400, in_channels=1)
    block = {  # basic block = 2 conv_bn (+ 1x1 projection conv + BN when the shape changes)
        (16, 16): 2 * conv_bn(16, 16),
        (16, 32): conv_bn(16, 32) + conv_bn(32, 32) + 16 * 32 + 2 * 32,
        (32, 32): 2 * conv_bn(32, 32),
        (32, 64): conv_bn(32, 64) + conv_bn(64, 64) + 32 * 64 + 2 * 64,
        (64, 64): 2 * conv_bn(64, 64),
    }
    hand_resnet = (
        conv_bn(1, 16)
        + 3 * block[16, 16]
        + block[16, 32]
        + 2 * block[32, 32]
        + block[32, 64]
        + 2 * block[64, 64]
        + 64 * 400
        + 400
    )
    assert count_parameters(resnet) == hand_resnet == 297_536
    assert (
        sum(1 for m in resnet.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
        == 19
    )


@pytest.mark.parametrize("name", ["cnn", "cnn_fast", "resnet"])
def test_width_and_depth_shrink_parameters(name: str) -> None:
    def params(width: float = 1.0, depth: float = 1.0) -> int:
        return count_parameters(
            create_model(name, num_classes=400, in_channels=1, width=width, depth=depth)
        )

    full = params()
    assert full >= 4 * params(width=0.25)
    assert params(width=0.5) < full < params(width=2.0)
    assert params(depth=0.5) < full < params(depth=2.0)


def test_depth_scales_number_of_layers() -> None:
    def convs(model: nn.Module) -> int:
        return sum(
            1 for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
        )

    assert convs(create_model("cnn", num_classes=3, depth=1.0)) == 1 + 3 * 2
    assert convs(create_model("cnn", num_classes=3, depth=2.0)) == 1 + 3 * 4
    assert (
        convs(create_model("resnet", num_classes=3, depth=1 / 3)) == 1 + 3 * 2
    )  # 1 block per stage


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
def test_invalid_multipliers_raise(bad: float) -> None:
    with pytest.raises(ValueError, match="width"):
        create_model("cnn", num_classes=3, width=bad)
    with pytest.raises(ValueError, match="depth"):
        create_model("resnet", num_classes=3, depth=bad)


def test_invalid_sizes_raise() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        create_model("cnn", num_classes=0)
    with pytest.raises(ValueError, match="too small"):
        create_model("cnn_fast", num_classes=3, image_size=4)


@pytest.mark.parametrize(
    ("name", "closest"), [("resnt", "resnet"), ("cnm", "cnn"), ("tv.resnet19", "tv.resnet18"),
                          ("TV.Resnet19", "tv.resnet18")]
)
def test_unknown_name_names_closest_match(name: str, closest: str) -> None:
    with pytest.raises(ValueError) as info:
        create_model(name, num_classes=3)
    message = str(info.value)
    assert message.startswith(f"unknown model {name!r}; did you mean {closest!r}? known models: ")
    assert "cnn, cnn_fast, resnet, resnet_cifar, tv." in message


def test_names_are_normalised() -> None:
    """Case and '-' do not matter, for registered families and torchvision models alike."""
    torch.manual_seed(0)
    a = create_model("CNN-Fast", num_classes=3, width=0.25)
    torch.manual_seed(0)
    b = create_model("cnn_fast", num_classes=3, width=0.25)
    assert type(a) is type(b) and str(a) == str(b)
    assert count_parameters(create_model("TV.ResNet18", num_classes=3)) == count_parameters(
        create_model("tv.resnet18", num_classes=3))


def test_list_models() -> None:
    names = list_models()
    assert names[:4] == ["cnn", "cnn_fast", "resnet", "resnet_cifar"]
    assert {"tv.resnet18", "tv.mobilenet_v3_small", "tv.efficientnet_b0"} <= set(names)
    assert not any(n in names for n in ("tv.vit_b_16", "tv.alexnet", "tv.googlenet"))


def test_register_model_adds_builder_and_rejects_duplicates(monkeypatch) -> None:
    name = "test_linear_probe"
    monkeypatch.setattr(MODELS, "_entries", dict(MODELS._entries))  # restored after the test

    def build(*, num_classes, in_channels, image_size, width, depth) -> Classifier:
        dim = in_channels * image_size * image_size
        return Classifier(
            Normalize(in_channels),
            nn.Sequential(nn.Flatten(1)),
            nn.Identity(),
            nn.Linear(dim, num_classes),
        )

    register_model(name)(build)
    assert name in list_models()
    model = create_model(name, num_classes=4, in_channels=1, image_size=8)
    assert count_parameters(model) == 64 * 4 + 4
    register_model(name)(build)  # the same builder again (a module imported twice): a no-op
    with pytest.raises(ValueError, match="a model named 'test_linear_probe' is already registered"):
        register_model("Test-Linear-Probe")(lambda **kwargs: build(**kwargs))
    with pytest.raises(ValueError, match="reserved"):
        register_model("TV.mine")


def test_normalisation_is_fixed_and_saved() -> None:
    model = create_model("cnn", num_classes=3, in_channels=2, mean=(0.25, 0.5), std=0.5)
    norm = model.stem[0]
    x = torch.tensor([0.25, 1.0]).view(1, 2, 1, 1)
    torch.testing.assert_close(norm(x), torch.tensor([0.0, 1.0]).view(1, 2, 1, 1))
    assert {"stem.0.mean", "stem.0.std"} <= set(model.state_dict())
    assert not any(p is norm.mean or p is norm.std for p in model.parameters())
    with pytest.raises(ValueError, match="3 values but the input has 2 channels"):
        create_model("cnn", num_classes=3, in_channels=2, mean=(0.1, 0.2, 0.3))


def test_state_dict_round_trip_gives_identical_outputs() -> None:
    torch.manual_seed(1)
    a = create_model("resnet", num_classes=6, in_channels=1, width=0.5).eval()
    torch.manual_seed(2)
    b = create_model("resnet", num_classes=6, in_channels=1, width=0.5).eval()
    x = torch.rand(2, 1, 32, 32)
    assert not torch.equal(a(x), b(x))
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_last_blocks_can_be_fine_tuned_alone() -> None:
    model = create_model("resnet", num_classes=5, in_channels=1, width=0.25)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in [*model.blocks[-1:].parameters(), *model.head.parameters()]:
        p.requires_grad_(True)
    model(torch.rand(3, 1, 32, 32)).sum().backward()
    assert model.stem[1].weight.grad is None
    assert model.blocks[-1][0].conv1.weight.grad is not None


def test_summarize_model_reports_exact_params_and_positive_latency() -> None:
    model = create_model("cnn", num_classes=5, in_channels=2, width=0.125, depth=0.5)
    model.train()
    summary = summarize_model(model, (2, 16, 16), batch_size=8, repeats=3)
    assert isinstance(summary, ModelSummary)
    assert summary.params == 1805
    assert summary.latency_ms > 0 and math.isfinite(summary.latency_ms)
    assert (summary.batch_size, summary.device) == (8, "cpu")
    assert model.training  # mode restored
    with pytest.raises(ValueError, match="input_shape"):
        summarize_model(model, (16, 16), batch_size=2)  # type: ignore[arg-type]
