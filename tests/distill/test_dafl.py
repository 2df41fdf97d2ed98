"""DAFL data-free distillation: losses, generator, the BatchNorm prior and the generator step."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill import (
    BatchNormPrior,
    Generator,
    activation_loss,
    dafl_generator_loss,
    information_entropy_loss,
    onehot_loss,
    train_generator_step,
)


def test_onehot_loss_is_ce_with_argmax():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    # row 0: -log(e^2 / (e^2 + 2)) ; row 1: -log(e / (e + 2))
    want = (math.log(1 + 2 * math.exp(-2)) + math.log(1 + 2 * math.exp(-1))) / 2
    assert onehot_loss(logits).item() == pytest.approx(want, rel=1e-6)
    assert onehot_loss(logits).item() == pytest.approx(
        F.cross_entropy(logits, torch.tensor([0, 2])).item()
    )


def test_activation_loss():
    feats = torch.tensor([[1.0, -3.0], [0.0, 2.0]])
    assert activation_loss(feats).item() == pytest.approx(-1.5)


def test_entropy_minimal_for_uniform_mean_distribution():
    k = 4
    # two confident samples on different classes... and their mirror images: mean is uniform
    uniform_mean = torch.tensor([[5.0, 0.0, 5.0, 0.0], [0.0, 5.0, 0.0, 5.0]])
    assert information_entropy_loss(uniform_mean).item() == pytest.approx(-math.log(k), rel=1e-6)
    # all samples agree on class 0: mean = softmax([5, 0, 0, 0]) has lower entropy
    p = torch.softmax(torch.tensor([5.0, 0.0, 0.0, 0.0]), 0)
    skewed = torch.tensor([[5.0, 0.0, 0.0, 0.0]] * 2)
    value = information_entropy_loss(skewed).item()
    assert value == pytest.approx((p * p.log()).sum().item(), rel=1e-6)
    assert value > -math.log(k) + 0.5
    torch.manual_seed(0)
    assert information_entropy_loss(torch.randn(16, k)).item() >= -math.log(k)


def test_dafl_generator_loss_combines_terms():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    feats = torch.tensor([[1.0, -3.0], [0.0, 2.0]])
    total, terms = dafl_generator_loss(logits, feats)
    want = terms["onehot"] + 0.1 * terms["activation"] + 5.0 * terms["entropy"]
    assert total.item() == pytest.approx(want.item())
    assert terms["activation"].item() == pytest.approx(-1.5)
    total, _ = dafl_generator_loss(logits, feats, w_onehot=0.0, w_activation=1.0, w_entropy=0.0)
    assert total.item() == pytest.approx(-1.5)


def test_generator_shapes_and_range():
    torch.manual_seed(0)
    gen = Generator(10, (3, 8, 12), hidden_channels=8)
    x = gen(torch.randn(4, 10))
    assert x.shape == (4, 3, 8, 12)
    assert x.min().item() >= 0.0 and x.max().item() <= 1.0
    assert Generator(4, (1, 8, 8), hidden_channels=4, num_upsamples=3)(torch.randn(2, 4)).shape == (
        2,
        1,
        8,
        8,
    )
    with pytest.raises(ValueError, match="divisible"):
        Generator(10, (3, 10, 10))


class TinyTeacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.features(x))


def _eval_loss(gen, teacher, z):
    with torch.no_grad():
        feats = teacher.features(gen(z))
        return dafl_generator_loss(teacher.fc(feats), feats)[0].item()


def test_generator_steps_reduce_loss_and_keep_teacher_frozen():
    torch.manual_seed(0)
    teacher = TinyTeacher()
    with torch.no_grad():
        teacher.fc.weight.mul_(5.0)  # sharper teacher: more for the generator to gain
    teacher.train()  # the step must switch it to eval (BN running stats untouched)
    gen = Generator(16, (1, 8, 8), hidden_channels=8)
    snapshot = {k: v.clone() for k, v in teacher.state_dict().items()}
    opt = torch.optim.Adam(gen.parameters(), lr=1e-2)
    rng = torch.Generator().manual_seed(1)
    z = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    teacher.eval()
    before = _eval_loss(gen, teacher, z)
    teacher.train()
    totals = []
    for _ in range(10):
        step = train_generator_step(gen, teacher, opt, 16, feature_path="fc", feature_capture="input", rng=rng)
        totals.append(step.loss.item())
    teacher.eval()
    after = _eval_loss(gen, teacher, z)
    # measured: -5.309 -> -5.418 on the fixed z; -5.313 -> -5.419 along the steps
    assert after < before - 0.05
    assert totals[-1] < totals[0] - 0.05
    assert set(step.terms) == {"onehot", "activation", "entropy"}
    assert step.images.shape == (16, 1, 8, 8) and step.logits.shape == (16, 4)
    assert not step.images.requires_grad and not step.logits.requires_grad
    # teacher: parameters and buffers unchanged, no grads, flags and mode restored
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, snapshot[key]), key
    assert all(p.grad is None and p.requires_grad for p in teacher.parameters())
    teacher.train()
    train_generator_step(gen, teacher, opt, 8, feature_path="fc", feature_capture="input", rng=rng)
    assert teacher.training


def test_batchnorm_prior_term_matches_the_running_statistics():
    torch.manual_seed(0)
    teacher = TinyTeacher().eval()
    bn = teacher.features[1]
    with torch.no_grad():
        bn.running_mean.fill_(0.5)
        bn.running_var.fill_(2.0)
    prior = BatchNormPrior(teacher)
    assert prior.layers == [bn]
    x = torch.rand(6, 1, 8, 8)
    with prior:
        with torch.no_grad():
            teacher(x)  # not recorded under no_grad
        assert prior.pop() is None
        teacher(x)
    conv = teacher.features[0](x)  # the BatchNorm input, (6, 8, 8, 8)
    want = (torch.linalg.vector_norm(conv.mean(dim=(0, 2, 3)) - 0.5)
            + torch.linalg.vector_norm(conv.var(dim=(0, 2, 3), unbiased=False) - 2.0))
    assert prior.pop().item() == pytest.approx(want.item(), rel=1e-6)
    teacher(x)  # after the with block the hooks are gone
    assert prior.pop() is None

    gen = Generator(4, (1, 8, 8), hidden_channels=4)
    opt = torch.optim.SGD(gen.parameters(), lr=0.0)
    z_rng = torch.Generator().manual_seed(3)
    plain = train_generator_step(gen, teacher, opt, 4, feature_path="fc", feature_capture="input", rng=z_rng)
    z_rng.manual_seed(3)
    with_prior = train_generator_step(gen, teacher, opt, 4, feature_path="fc", feature_capture="input",
                                      bn_prior=prior, w_bn=2.0, rng=z_rng)
    assert "bn" not in plain.terms and with_prior.terms["bn"].item() > 0
    assert with_prior.loss.item() == pytest.approx(plain.loss.item() + 2.0 * with_prior.terms["bn"].item(),
                                                   rel=1e-6)


def test_train_step_rejects_teacher_in_optimizer_and_tiny_batch():
    teacher = TinyTeacher()
    gen = Generator(4, (1, 4, 4), hidden_channels=4)
    bad = torch.optim.SGD(list(gen.parameters()) + list(teacher.parameters()), lr=0.1)
    with pytest.raises(ValueError, match="teacher parameters"):
        train_generator_step(gen, teacher, bad, 4, feature_path="fc", feature_capture="input")
    opt = torch.optim.SGD(gen.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="batch_size"):
        train_generator_step(gen, teacher, opt, 1, feature_path="fc", feature_capture="input")
    with pytest.raises(ValueError, match="feature_path"):
        train_generator_step(gen, teacher, opt, 4)  # teacher returns logits only
