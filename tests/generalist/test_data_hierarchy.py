"""The built-in `hierarchy` data set: planted super-classes that a classifier can find."""

import pytest
import torch

from generalist.data import DataError, create_dataset, to_float


def _nearest_mean_predictions(bundle):
    x = to_float(bundle.train.images).flatten(1)
    means = torch.stack([x[bundle.train.labels == k].mean(0) for k in range(bundle.num_classes)])
    return torch.cdist(to_float(bundle.test.images).flatten(1), means).argmin(1)


def test_superclass_of_and_names():
    bundle = create_dataset("hierarchy", num_superclasses=4, classes_per_superclass=3,
                            train_per_class=5, holdout_per_class=2, test_per_class=3)
    assert bundle.num_classes == 12
    assert bundle.info["superclass_of"] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert bundle.class_names[4] == "s1_c1"
    assert bundle.image_shape == (1, 16, 16)
    assert [len(bundle.train), len(bundle.holdout), len(bundle.test)] == [60, 24, 36]
    assert torch.bincount(bundle.train.labels).tolist() == [5] * 12


def test_defaults_are_learnable_but_imperfect_with_mistakes_inside_superclasses():
    bundle = create_dataset("hierarchy", seed=0)
    assert bundle.num_classes == 40
    predicted, truth = _nearest_mean_predictions(bundle), bundle.test.labels
    superclass = torch.tensor(bundle.info["superclass_of"])
    accuracy = (predicted == truth).float().mean().item()
    wrong = predicted != truth
    inside = (superclass[predicted] == superclass[truth])[wrong].float().mean().item()
    assert 0.35 < accuracy < 0.85  # chance is 0.025
    assert inside > 0.9


def test_zero_within_separation_makes_siblings_indistinguishable():
    bundle = create_dataset("hierarchy", within_separation=0.0, train_per_class=60)
    predicted, truth = _nearest_mean_predictions(bundle), bundle.test.labels
    superclass = torch.tensor(bundle.info["superclass_of"])
    assert (superclass[predicted] == superclass[truth]).float().mean() > 0.97
    assert (predicted == truth).float().mean() < 0.4  # about 1 / 5 inside a super-class


def test_same_seed_same_bytes_other_seed_other_samples():
    a = create_dataset("hierarchy", seed=3, train_per_class=10)
    b = create_dataset("hierarchy", seed=3, train_per_class=10)
    c = create_dataset("hierarchy", seed=4, train_per_class=10)
    assert a.describe() == b.describe()
    assert a.describe()["splits"]["test"]["sha256"] != c.describe()["splits"]["test"]["sha256"]


def test_options_are_validated():
    with pytest.raises(DataError, match="classes_per_superclass"):
        create_dataset("hierarchy", classes_per_superclass=0)
    with pytest.raises(DataError, match="valid options"):
        create_dataset("hierarchy", num_classes=10)
    size = create_dataset("hierarchy", image_size=8, train_per_class=2).image_shape
    assert size == (1, 8, 8)
