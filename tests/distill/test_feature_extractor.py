"""FeatureExtractor: hooks by dotted path, capture, clean removal, helpful errors."""

import pytest
import torch
from torch import nn

from distill import FeatureExtractor


class Block(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv2(torch.relu(self.conv1(x)))) + x


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.blocks = nn.Sequential(Block(4), Block(4), Block(4))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_captures_the_right_tensors_and_removes_hooks():
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(2, 1, 6, 6)
    with FeatureExtractor(net, ["blocks.1", "blocks.2.conv2", "head"]) as ex:
        out = net(x)
        assert _hook_count(net) == 4  # 3 forward hooks + the clearing pre-hook
    assert _hook_count(net) == 0
    # recompute the same tensors by hand
    h1 = net.blocks[1](net.blocks[0](net.stem(x)))
    conv2 = net.blocks[2].conv2(torch.relu(net.blocks[2].conv1(h1)))
    torch.testing.assert_close(ex.features["blocks.1"], h1)
    torch.testing.assert_close(ex.features["blocks.2.conv2"], conv2)
    torch.testing.assert_close(ex.features["head"], out)
    assert ex.features["blocks.1"].shape == (2, 4, 6, 6)
    # features stay readable after exit but are no longer updated
    before = ex.features["head"]
    net(torch.randn(2, 1, 6, 6))
    assert ex.features["head"] is before


def test_input_capture_and_gradients_flow():
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(2, 1, 6, 6)
    with FeatureExtractor(net, ["head"], capture="input") as ex:
        net(x)
    pooled = ex.features["head"]
    assert pooled.shape == (2, 4)
    pooled.sum().backward()  # not detached: reaches the student's parameters
    assert net.stem.weight.grad is not None
    with FeatureExtractor(net, ["stem"], detach=True) as ex:
        net(x)
    assert not ex.features["stem"].requires_grad


def test_features_hold_only_the_last_forward():
    net = Net()
    with FeatureExtractor(net, ["blocks.0"]) as ex:
        net(torch.zeros(1, 1, 4, 4))
        first = ex.features["blocks.0"]
        net(torch.zeros(3, 1, 4, 4))
    assert first.shape[0] == 1 and ex.features["blocks.0"].shape[0] == 3


def test_hooks_removed_when_forward_raises():
    net = Net()
    with pytest.raises(RuntimeError), FeatureExtractor(net, ["stem"]):
        net(torch.zeros(1, 2, 4, 4))  # wrong channel count
    assert _hook_count(net) == 0


def test_unknown_path_lists_close_matches():
    net = Net()
    with pytest.raises(ValueError) as info:
        FeatureExtractor(net, ["blocks.1.conv3"])
    msg = str(info.value)
    assert "'blocks.1.conv3'" in msg and "blocks.1.conv1" in msg and "blocks.1.conv2" in msg
    with pytest.raises(ValueError, match="some valid paths.*stem"):
        FeatureExtractor(net, ["zzzzzz"])
    with pytest.raises(ValueError, match=r"wrap it in a list: \['stem'\]"):
        FeatureExtractor(net, "stem")
