"""External adapters, tested offline on tiny fakes written in each native on-disk format."""

import gzip
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from generalist.data import DataError, create_dataset


def _cifar100(root, n_train=40, n_test=12):
    rng = np.random.default_rng(0)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    fine_names = ["apple", "bee", "cloud", "dolphin"]
    coarse_of = [0, 1, 2, 1]
    data = {}
    for split, n in (("train", n_train), ("test", n_test)):
        fine = np.arange(n) % 4
        images = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        data[split] = (images, fine)
        payload = {b"data": images, b"fine_labels": fine.tolist(),
                   b"coarse_labels": [coarse_of[f] for f in fine]}
        (folder / split).write_bytes(pickle.dumps(payload))
    meta = {b"fine_label_names": fine_names, b"coarse_label_names": ["fruit", "fauna", "sky"]}
    (folder / "meta").write_bytes(pickle.dumps(meta))
    return data


def _idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


def test_fake_cifar100_round_trip(tmp_path):
    data = _cifar100(tmp_path)
    bundle = create_dataset("cifar100", root=str(tmp_path), seed=0, holdout_fraction=0.2)
    assert bundle.class_names == ("apple", "bee", "cloud", "dolphin")
    assert bundle.image_shape == (3, 32, 32)
    assert [len(bundle.train), len(bundle.holdout), len(bundle.test)] == [32, 8, 12]
    assert torch.bincount(bundle.holdout.labels).tolist() == [2, 2, 2, 2]
    images, labels = data["test"]
    assert torch.equal(bundle.test.images, torch.from_numpy(images.reshape(-1, 3, 32, 32)))
    assert bundle.test.labels.tolist() == labels.tolist()
    train_images, _ = data["train"]
    original = {row.tobytes() for row in train_images}
    carved = bundle.train.images.reshape(-1, 3072).numpy()
    assert all(row.tobytes() in original for row in carved)
    assert bundle.info["superclass_of"] == [0, 1, 2, 1]
    assert bundle.info["superclass_names"] == ["fruit", "fauna", "sky"]


def test_holdout_is_deterministic_by_seed(tmp_path):
    _cifar100(tmp_path)
    first = create_dataset("cifar100", root=str(tmp_path), seed=1)
    again = create_dataset("cifar100", root=str(tmp_path), seed=1)
    other = create_dataset("cifar100", root=str(tmp_path), seed=2)
    assert first.describe() == again.describe()
    assert first.describe()["splits"]["holdout"] != other.describe()["splits"]["holdout"]
    assert first.describe()["splits"]["test"] == other.describe()["splits"]["test"]
    assert len(first.holdout) == 4  # round(0.1 * 10) per class, at least one


def test_fake_cifar10_round_trip(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    names = ["airplane", "automobile", "bird"]
    for batch in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        payload = {"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8), "labels": [0, 1, 2] * 2}
        (folder / batch).write_bytes(pickle.dumps(payload))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    bundle = create_dataset("cifar10", root=str(tmp_path), holdout_fraction=0.0)
    assert bundle.class_names == tuple(names)
    assert [len(bundle.train), len(bundle.holdout), len(bundle.test)] == [30, 0, 6]


def test_fake_mnist_idx_files_plain_and_gzipped(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(2)
    train_images = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    test_images = rng.integers(0, 256, (10, 28, 28), dtype=np.uint8)
    _idx(raw / "train-images-idx3-ubyte", train_images)
    _idx(raw / "train-labels-idx1-ubyte", np.arange(30) % 10)
    _idx(raw / "t10k-images-idx3-ubyte.gz", test_images)
    _idx(raw / "t10k-labels-idx1-ubyte.gz", np.arange(10))
    bundle = create_dataset("mnist", root=str(tmp_path), num_classes=10)
    assert bundle.image_shape == (1, 28, 28)
    assert bundle.class_names[3] == "3 - three"
    assert torch.equal(bundle.test.images[:, 0], torch.from_numpy(test_images))
    assert bundle.test.labels.tolist() == list(range(10))
    assert len(bundle.train) + len(bundle.holdout) == 30 and len(bundle.holdout) == 10


def test_missing_data_says_where_it_looked_and_how_to_get_it(tmp_path):
    with pytest.raises(DataError) as caught:
        create_dataset("cifar100", root=str(tmp_path / "nowhere"))
    message = str(caught.value)
    assert str(tmp_path / "nowhere" / "cifar-100-python" / "train") in message
    assert "download=True" in message and "copy" in message
    assert "'glyphs'" in message and "'hierarchy'" in message
    with pytest.raises(DataError, match="fashion_mnist needs root=.*'glyphs' and 'hierarchy'"):
        create_dataset("fashion_mnist")
    with pytest.raises(DataError, match="KMNIST/raw/train-images-idx3-ubyte"):
        create_dataset("kmnist", root=str(tmp_path))


def test_num_classes_mismatch_names_both_numbers(tmp_path):
    _cifar100(tmp_path)
    with pytest.raises(DataError, match=r"has 4 classes but num_classes=100 .*num_classes=4"):
        create_dataset("cifar100", root=str(tmp_path), num_classes=100)
    with pytest.raises(DataError, match="valid options"):
        create_dataset("cifar100", root=str(tmp_path), image_size=64)


def _png_tree(folder, classes, per_class, size=(20, 12)):
    rng = np.random.default_rng(3)
    for name in classes:
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i}.png")


def test_image_folder_round_trip_with_carved_test(tmp_path):
    _png_tree(tmp_path, ["cat", "dog", "eel"], per_class=10)
    bundle = create_dataset("image_folder", root=str(tmp_path), image_size=8, channels=3)
    assert bundle.class_names == ("cat", "dog", "eel")
    assert bundle.image_shape == (3, 8, 8)
    assert [len(bundle.train), len(bundle.holdout), len(bundle.test)] == [24, 3, 3]
    assert torch.bincount(bundle.test.labels).tolist() == [1, 1, 1]
    expected = {
        np.asarray(Image.open(tmp_path / c / f"{i}.png").convert("RGB").resize(
            (8, 8), Image.Resampling.BILINEAR)).transpose(2, 0, 1).tobytes(): k
        for k, c in enumerate(["cat", "dog", "eel"]) for i in range(10)
    }
    for split in (bundle.train, bundle.holdout, bundle.test):
        for image, label in zip(split.images, split.labels, strict=True):
            assert expected[image.numpy().tobytes()] == int(label)
    gray = create_dataset("image_folder", root=str(tmp_path), image_size=8, channels=1)
    assert gray.image_shape == (1, 8, 8)
    assert gray.describe() == create_dataset("image_folder", root=str(tmp_path), image_size=8,
                                             channels=1).describe()


def test_image_folder_uses_train_and_test_folders(tmp_path):
    _png_tree(tmp_path / "train", ["a", "b"], per_class=5)
    _png_tree(tmp_path / "test", ["a", "b"], per_class=2)
    bundle = create_dataset("image_folder", root=str(tmp_path), holdout_fraction=0.2)
    assert bundle.info["test_source"] == "test/"
    assert [len(bundle.train), len(bundle.holdout), len(bundle.test)] == [8, 2, 4]


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        create_dataset("image_folder", root=str(tmp_path / "missing"))
    with pytest.raises(DataError, match="needs root="):
        create_dataset("image_folder")
    with pytest.raises(DataError, match="0 class folder"):
        create_dataset("image_folder", root=str(tmp_path))
    _png_tree(tmp_path, ["only"], per_class=3)
    with pytest.raises(DataError, match="at least 2"):
        create_dataset("image_folder", root=str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        create_dataset("image_folder", root=str(tmp_path))
    _png_tree(tmp_path, ["two"], per_class=3)
    (tmp_path / "empty").rmdir()
    with pytest.raises(DataError, match="has 2 classes but num_classes=5"):
        create_dataset("image_folder", root=str(tmp_path), num_classes=5)
    with pytest.raises(DataError, match="channels=1 or 3"):
        create_dataset("image_folder", root=str(tmp_path), channels=2)


def test_image_folder_holdout_by_source_shares_no_source_with_training(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        for writer in range(1, 11):
            (tmp_path / "train" / name).mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (6, 6), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "train" / name / f"{name}{writer}_{writer:02d}.png")
        (tmp_path / "test" / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8)).save(tmp_path / "test" / name / "t_99.png")
    bundle = create_dataset("image_folder", root=str(tmp_path), image_size=6, channels=1,
                            holdout_fraction=0.2, source_pattern=r"_(\d+)\.png$")
    held = bundle.info["holdout_sources"]
    assert len(held) == 2 and [len(bundle.train), len(bundle.holdout)] == [24, 6]
    assert torch.bincount(bundle.holdout.labels).tolist() == [2, 2, 2]   # every class, held-out writers
    again = create_dataset("image_folder", root=str(tmp_path), image_size=6, channels=1,
                           holdout_fraction=0.2, source_pattern=r"_(\d+)\.png$")
    assert again.info["holdout_sources"] == held
    with pytest.raises(DataError, match="does not match the file name"):
        create_dataset("image_folder", root=str(tmp_path), image_size=6, channels=1,
                       source_pattern=r"_writer(\d+)")
    with pytest.raises(DataError, match="not a regular expression"):
        create_dataset("image_folder", root=str(tmp_path), image_size=6, channels=1, source_pattern="(")


class _Evaluates:
    def __reduce__(self):
        return eval, ("__import__('pathlib').Path('evaluated').touch()",)


@pytest.mark.parametrize("protocol", [2, 5])
def test_a_cifar_pickle_that_calls_anything_else_is_refused(tmp_path, monkeypatch, protocol):
    monkeypatch.chdir(tmp_path)
    _cifar100(tmp_path)
    (tmp_path / "cifar-100-python" / "meta").write_bytes(pickle.dumps({b"fine_label_names": _Evaluates()},
                                                                      protocol=protocol))
    with pytest.raises(DataError, match=r"refused to read .*cifar-100-python/meta: it refers to (builtins|__builtin__)\.eval"):
        create_dataset("cifar100", root=str(tmp_path))
    assert not (tmp_path / "evaluated").exists()
