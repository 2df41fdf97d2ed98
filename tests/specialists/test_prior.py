"""Tests for specialists.prior: the dustbin prior correction after 50/50 training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from specialists.model import build_specialist, collapse_probs, trainable_parameters
from specialists.prior import apply_prior_correction, dustbin_log_correction, group_prior
from specialists.sampler import HalfAndHalfBatchSampler, specialist_targets


class LinearGeneralist(nn.Module):
    """Classifier contract with an identity trunk: features = inputs ``(B, D)``."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Identity()
        self.blocks = nn.Sequential()
        self.head = nn.Linear(dim, num_classes)
        self.feature_dim = dim

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


# Synthetic problem: 4 Gaussian classes in 2-D (unit covariance), specialist group {0, 1}.
MEANS = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]])
PRIORS = torch.tensor([0.12, 0.08, 0.45, 0.35])
GROUP = (0, 1)
PI = 0.2


def bayes_generalist(priors: torch.Tensor) -> LinearGeneralist:
    """Generalist whose logits are the exact Bayes log-posteriors (up to a constant)."""
    gen = LinearGeneralist(2, 4)
    with torch.no_grad():
        gen.head.weight.copy_(MEANS)
        gen.head.bias.copy_(-0.5 * (MEANS**2).sum(1) + priors.log())
    return gen.eval()


def sample(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.multinomial(PRIORS, n, replacement=True, generator=g)
    x = MEANS[y] + torch.randn(n, 2, generator=g)
    return x, y


def true_collapsed(x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return collapse_probs(torch.softmax(bayes_generalist(PRIORS)(x), 1), GROUP)


def test_group_prior_and_hand_corrections() -> None:
    labels = np.array([0, 1, 2, 3, 2, 3, 2, 3, 2, 3])
    assert group_prior(labels, GROUP) == pytest.approx(0.2)
    assert group_prior(torch.as_tensor(labels), (3,)) == pytest.approx(0.4)
    assert dustbin_log_correction(0.2) == pytest.approx(math.log(4.0), abs=1e-12)
    assert dustbin_log_correction(0.2, 0.3) == pytest.approx(math.log(4.0 * 3.0 / 7.0), abs=1e-12)
    assert dustbin_log_correction(0.3, 0.3) == pytest.approx(0.0, abs=1e-12)
    assert dustbin_log_correction(0.75) == pytest.approx(-math.log(3.0), abs=1e-12)


def test_correction_on_hand_logits() -> None:
    gen = LinearGeneralist(3, 3)
    with torch.no_grad():
        gen.head.weight.copy_(torch.eye(3))
        gen.head.bias.zero_()
    spec = build_specialist(gen, (0,), finetune="head").eval()
    # logits (0, log .5, log .5): group logit 0, dustbin logsumexp = log 1 = 0 -> (0.5, 0.5)
    x = torch.tensor([[0.0, math.log(0.5), math.log(0.5)]])
    with torch.no_grad():
        torch.testing.assert_close(torch.softmax(spec(x), 1), torch.tensor([[0.5, 0.5]]))
        fixed = apply_prior_correction(spec, 0.2)
        # dustbin logit + log 4: probabilities (1, 4) / 5
        torch.testing.assert_close(torch.softmax(fixed(x), 1), torch.tensor([[0.2, 0.8]]))
    assert fixed.prior_correction == pytest.approx(math.log(4.0))
    assert float(fixed.dustbin_bias.detach()) == pytest.approx(math.log(4.0))
    assert spec.prior_correction is None and float(spec.dustbin_bias.detach()) == 0.0


def test_correction_applied_only_once_even_after_state_dict_roundtrip() -> None:
    spec = build_specialist(bayes_generalist(PRIORS), GROUP)
    fixed = apply_prior_correction(spec, PI)
    with pytest.raises(ValueError, match="already"):
        apply_prior_correction(fixed, PI)
    with pytest.raises(ValueError, match="already"):
        fixed.add_prior_correction(0.1)
    reloaded = build_specialist(bayes_generalist(PRIORS), GROUP)
    reloaded.load_state_dict(fixed.state_dict())
    assert reloaded.prior_correction == pytest.approx(math.log(4.0))
    with pytest.raises(ValueError, match="already"):
        apply_prior_correction(reloaded, PI)


def mix_collapsed(x: torch.Tensor, f: float) -> torch.Tensor:
    """Collapsed Bayes posterior when the group makes up a fraction f of the data."""
    with torch.no_grad():
        return collapse_probs(torch.softmax(bayes_generalist(PRIORS * mix_weights(f))(x), 1),
                              GROUP)


def mix_weights(f: float) -> torch.Tensor:
    """Per-class reweighting of the priors by a mix with in-group fraction f."""
    return torch.tensor([f / PI, f / PI, (1 - f) / (1 - PI), (1 - f) / (1 - PI)])


@pytest.mark.parametrize("f", [0.5, 0.3, 0.8])
def test_correction_exact_for_bayes_optimal_mix_model(f: float) -> None:
    """A specialist equal to the Bayes posterior of the f-mix becomes the true posterior."""
    spec = build_specialist(bayes_generalist(PRIORS * mix_weights(f)), GROUP).eval()
    x = torch.randn(500, 2, generator=torch.Generator().manual_seed(0)) * 2.0
    with torch.no_grad():
        before = torch.softmax(spec(x), 1)
        after = torch.softmax(apply_prior_correction(spec, PI, f)(x), 1)
    truth = true_collapsed(x)
    assert float((after - truth).abs().max()) <= 1e-5
    assert float((before - truth).abs().max()) > 0.1  # the mix really biases the posterior


def test_trained_with_half_and_half_sampler_then_corrected_matches_true_posterior() -> None:
    torch.manual_seed(0)
    x_train, y_train = sample(20000, seed=1)
    pi = group_prior(y_train, GROUP)
    assert abs(pi - PI) < 0.01
    # Start the group rows from scratch; the dustbin keeps the (frozen) generalist out-rows.
    spec = build_specialist(bayes_generalist(PRIORS), GROUP, finetune="head")
    with torch.no_grad():
        spec.head.weight.zero_()
        spec.head.bias.zero_()
    sampler = HalfAndHalfBatchSampler(y_train, GROUP, batch_size=512, num_batches=150, seed=2)
    targets = specialist_targets(y_train, GROUP)
    opt = torch.optim.Adam(trainable_parameters(spec), lr=0.1)
    spec.train()
    for batch in sampler:
        loss = nn.functional.cross_entropy(spec(x_train[batch]), targets[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    spec.eval()
    x_test, _ = sample(5000, seed=3)
    truth = true_collapsed(x_test)[:, -1]
    with torch.no_grad():
        raw = torch.softmax(spec(x_test), 1)[:, -1]
        fixed = torch.softmax(apply_prior_correction(spec, pi, sampler.in_group_fraction)(x_test),
                              1)[:, -1]
    err_raw = float((raw - truth).abs().mean())
    err_fixed = float((fixed - truth).abs().mean())
    assert err_fixed < 0.02
    assert err_raw > 5 * err_fixed
    # Uncorrected, the specialist fits the posterior of the 50/50 training mix instead.
    mix_truth = mix_collapsed(x_test, 0.5)[:, -1]
    assert float((raw - mix_truth).abs().mean()) < 0.02
    assert float(fixed.mean()) == pytest.approx(float(truth.mean()), abs=0.01)


@pytest.mark.parametrize(
    ("pi", "f", "match"),
    [(0.0, 0.5, "pi_m must lie strictly between 0 and 1"), (1.0, 0.5, "pi_m"),
     (0.2, 0.0, "in_group_fraction"), (0.2, 1.0, "in_group_fraction"),
     (float("nan"), 0.5, "pi_m"), ("a", 0.5, "pi_m must be a float")],
)
def test_bad_fractions(pi: float, f: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dustbin_log_correction(pi, f)


def test_group_prior_and_apply_errors() -> None:
    with pytest.raises(ValueError, match="empty"):
        group_prior(np.array([], dtype=np.int64), (1,))
    with pytest.raises(ValueError, match="Specialist"):
        apply_prior_correction(nn.Linear(2, 2), 0.2)  # type: ignore[arg-type]


def test_shift_then_correct_an_untrained_specialist_gives_back_the_generalist():
    """Training starts at the posterior under the 50/50 mix; the correction undoes exactly that."""
    from generalist.models import create_model
    from specialists.prior import shift_to_training_mix

    torch.manual_seed(0)
    generalist = create_model("cnn", num_classes=6, in_channels=1, image_size=16, width=0.25).eval()
    group, pi = (1, 4), 0.2
    spec = build_specialist(generalist, group)
    shift_to_training_mix(spec, pi, 0.5)
    x = torch.rand(5, 1, 16, 16)
    with torch.no_grad():
        target = collapse_probs(torch.softmax(generalist(x), 1), group)          # (5, 3)
        shifted = torch.softmax(spec.eval()(x), 1)
        # under the 50/50 mix the in-group odds are multiplied by (1 - pi) / pi = 4
        odds = target[:, :2].sum(1) / target[:, 2]
        assert torch.allclose(shifted[:, :2].sum(1) / shifted[:, 2], 4 * odds, rtol=1e-4)
        corrected = apply_prior_correction(spec, pi, 0.5).eval()
        assert torch.allclose(torch.softmax(corrected(x), 1), target, atol=1e-5)
