"""FolderSource: the image_folder data set's splits, read file by file."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from generalist.data import DataError, create_dataset
from generalist.data.folder_source import FolderSource
from generalist.data.source import ExampleSource, InMemorySource

SPLITS = ("train", "holdout", "test")


def _png_tree(folder, classes, per_class, size=(9, 7), seed=3):
    rng = np.random.default_rng(seed)
    for name in classes:
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{name}_{i % 4}_{i}.png")


def _same(folder: FolderSource, memory: InMemorySource) -> None:
    assert folder.class_names == memory.class_names and folder.image_shape == memory.image_shape
    assert folder.info == memory.info
    for split in SPLITS:
        assert np.array_equal(folder.class_counts(split), memory.class_counts(split))
        assert np.array_equal(folder.class_positions(split, [0, 2]), memory.class_positions(split, [0, 2]))
        n = folder.size(split)
        assert torch.equal(folder.take(split, np.arange(n)).images, memory.take(split, np.arange(n)).images)
    for (xf, yf), (xm, ym) in zip(folder.batches("train", batch_size=7, shuffle=True, seed=2, epoch=1),
                                  memory.batches("train", batch_size=7, shuffle=True, seed=2, epoch=1),
                                  strict=True):
        assert torch.equal(xf, xm) and torch.equal(yf, ym)


@pytest.mark.parametrize("options", [
    {"image_size": 6, "channels": 3},
    {"image_size": 5, "channels": 1, "holdout_fraction": 0.25, "test_fraction": 0.2},
    {"image_size": 6, "channels": 3, "source_pattern": r"_(\d)_\d+\.png$", "holdout_fraction": 0.3},
])
def test_carved_splits_equal_the_image_folder_data_set(tmp_path, options):
    _png_tree(tmp_path, ["ant", "bee", "cow"], per_class=12)
    folder = FolderSource(str(tmp_path), seed=5, **options)
    assert isinstance(folder, ExampleSource)
    _same(folder, InMemorySource(create_dataset("image_folder", root=str(tmp_path), seed=5, **options)))


def test_train_and_test_folders_equal_the_image_folder_data_set(tmp_path):
    _png_tree(tmp_path / "train", ["a", "b", "c"], per_class=8)
    _png_tree(tmp_path / "test", ["a", "b", "c"], per_class=3, seed=4)
    folder = FolderSource(str(tmp_path), seed=1, image_size=4)
    assert [folder.size(s) for s in SPLITS] == [21, 3, 9]
    _same(folder, InMemorySource(create_dataset("image_folder", root=str(tmp_path), seed=1, image_size=4)))


def test_two_ranks_split_each_global_batch(tmp_path):
    _png_tree(tmp_path, ["a", "b"], per_class=10)
    folder = pickle.loads(pickle.dumps(FolderSource(str(tmp_path), image_size=4, seed=3)))
    assert folder.options["seed"] == 3 and len(pickle.dumps(folder)) < 1000
    parts = [list(folder.batches("train", batch_size=4, shuffle=True, rank=r, world_size=2)) for r in (0, 1)]
    whole = list(folder.batches("train", batch_size=4, shuffle=True))
    assert len(parts[0]) == len(parts[1]) == folder.size("train") // 4
    assert torch.equal(torch.cat([parts[0][0][1], parts[1][0][1]]), whole[0][1])


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        FolderSource(str(tmp_path / "missing"))
    _png_tree(tmp_path / "train", ["a", "b"], per_class=3)
    _png_tree(tmp_path / "test", ["a", "b", "z"], per_class=1)
    with pytest.raises(DataError, match=r"has classes \['z'\] that .* lacks"):
        FolderSource(str(tmp_path))
    (tmp_path / "test" / "z" / "z_0_0.png").unlink()
    (tmp_path / "test" / "z").rmdir()
    (tmp_path / "train" / "a" / "a_0_0.png").write_bytes(b"broken")
    source = FolderSource(str(tmp_path), image_size=4)
    with pytest.raises(DataError, match=r"cannot read image .*a_0_0\.png"):
        list(source.batches("train", batch_size=2, shuffle=False))
