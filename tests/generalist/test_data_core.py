"""Contract of the data layer's containers and registry (Split, DataBundle, create_dataset)."""

import hashlib
import json

import numpy as np
import pytest
import torch

from generalist.data import (
    DataBundle,
    DataError,
    Split,
    create_dataset,
    list_datasets,
    register_dataset,
    to_float,
)
from generalist.data.splits import stratified_indices


def _split(n: int, num_classes: int = 3, seed: int = 0) -> Split:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=gen)
    return Split(images, torch.arange(n, dtype=torch.int64) % num_classes)


def _bundle(seed: int = 0) -> DataBundle:
    return DataBundle("toy", ("a", "b", "c"), _split(12, seed=seed), _split(6, seed=seed + 1),
                      _split(3, seed=seed + 2), {"note": [1, 2]})


def test_split_subset_by_positions_and_mask():
    split = _split(6)
    picked = split.subset([4, 1])
    assert picked.labels.tolist() == [1, 1]
    assert torch.equal(picked.images[0], split.images[4])
    masked = split.subset(split.labels == 2)
    assert len(masked) == 2 and masked.labels.tolist() == [2, 2]
    assert len(split.subset([])) == 0
    assert masked.images.is_contiguous()


def test_split_rejects_wrong_dtypes_and_lengths():
    with pytest.raises(DataError, match="uint8"):
        Split(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(DataError, match="int64"):
        Split(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(DataError, match="2 images but 3 labels"):
        Split(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))


def test_split_makes_images_contiguous():
    images = torch.zeros(3, 1, 4, 5, dtype=torch.uint8).transpose(2, 3)
    assert not images.is_contiguous()
    assert Split(images, torch.zeros(3, dtype=torch.int64)).images.is_contiguous()


def test_bundle_properties_and_describe_pin_the_bytes():
    bundle = _bundle()
    assert bundle.num_classes == 3
    assert bundle.image_shape == (1, 4, 4)
    described = bundle.describe()
    assert json.loads(json.dumps(described)) == described
    expected = hashlib.sha256(
        bundle.train.images.numpy().tobytes() + bundle.train.labels.numpy().tobytes()
    ).hexdigest()
    assert described["splits"]["train"] == {"size": 12, "sha256": expected}
    assert described["splits"]["test"]["size"] == 3
    assert described == _bundle().describe()
    assert described["splits"]["train"]["sha256"] != _bundle(seed=5).describe()["splits"]["train"]["sha256"]


def test_bundle_rejects_bad_labels_shapes_and_info():
    with pytest.raises(DataError, match=r"labels span \[0, 2\] but there are 2 class names"):
        DataBundle("toy", ("a", "b"), _split(6), _split(3), _split(3), {})
    odd = Split(torch.zeros(2, 1, 5, 5, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(DataError, match="different image shapes"):
        DataBundle("toy", ("a", "b", "c"), _split(6), odd, _split(3), {})
    with pytest.raises(DataError, match="JSON"):
        DataBundle("toy", ("a", "b", "c"), _split(6), _split(3), _split(3), {"t": torch.ones(1)})


def test_to_float_scales_uint8_to_unit_range():
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    out = to_float(images)
    assert out.dtype == torch.float32
    assert torch.allclose(out.flatten(), torch.tensor([0.0, 0.2, 1.0]))
    with pytest.raises(DataError, match="uint8"):
        to_float(out)


def test_registry_round_trip_and_option_checking():
    @register_dataset("test_data_core_toy")
    def build_toy(*, root=None, seed=0, size: int = 4):
        return _bundle(seed)

    assert "test_data_core_toy" in list_datasets()
    assert {"glyphs", "hierarchy", "cifar100", "image_folder"} <= set(list_datasets())
    assert create_dataset("test_data_core_toy", seed=3).describe() == _bundle(3).describe()
    with pytest.raises(DataError, match=r"unknown option\(s\) \['colour'\]; valid options are \['size'\]"):
        create_dataset("test_data_core_toy", colour=1)
    with pytest.raises(DataError, match=r"unknown data set 'glyph'; did you mean 'glyphs'\? known data "
                                        r"sets: .*Register new ones with @register_dataset\(name\)\."):
        create_dataset("glyph")
    with pytest.raises(DataError, match="a data set named 'test_data_core_toy' is already registered"):
        register_dataset("Test-Data-Core-Toy")(lambda **kwargs: _bundle(0))
    with pytest.raises(DataError, match="seed"):
        create_dataset("test_data_core_toy", seed=-1)


def test_stratified_indices_carve_each_class():
    labels = np.repeat(np.arange(4), [10, 10, 5, 2])
    keep, carved = stratified_indices(labels, 0.2, seed=0)
    assert sorted(np.concatenate([keep, carved]).tolist()) == list(range(27))
    assert np.bincount(labels[carved]).tolist() == [2, 2, 1, 1]
    again = stratified_indices(labels, 0.2, seed=0)[1]
    other = stratified_indices(labels, 0.2, seed=1)[1]
    assert again.tolist() == carved.tolist() and other.tolist() != carved.tolist()
