"""What a specialist task is sent and what it reads: a small descriptor of the data, then only
its group's examples (by ``class_positions``) and the sampled rest (by ``take``)."""

from __future__ import annotations

import pickle
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from generalist.data import Split, create_dataset
from generalist.data.source import InMemorySource
from generalist.models import create_model
from orchestration.checkpoints import save_model
from orchestration.config import SpecialistsConfig
from orchestration.data_access import open_descriptor, source_descriptor
from orchestration.specialist_job import SpecialistJob, train_specialist

K, GROUP = 9, (1, 4, 7)


class CountingSource:
    """A streaming-style source: labels and images computed from the position (nothing held),
    every ``class_positions`` and ``take`` call recorded; scanning a split is refused."""

    name, info, image_shape = "counting", {}, (1, 16, 16)
    class_names = tuple(str(c) for c in range(K))
    num_classes = K

    def __init__(self, n: int) -> None:
        self.n = n
        self.positions_asked: list[tuple[str, tuple[int, ...]]] = []
        self.taken: list[tuple[str, np.ndarray]] = []

    def size(self, split: str) -> int:
        return self.n if split == "train" else self.n // 10

    def _labels(self, split: str, positions: np.ndarray) -> np.ndarray:
        return (positions * 5 + (split == "holdout")) % K

    def class_counts(self, split: str) -> np.ndarray:
        return np.bincount(self._labels(split, np.arange(self.size(split))), minlength=K)

    def class_positions(self, split: str, classes: Sequence[int]) -> np.ndarray:
        self.positions_asked.append((split, tuple(classes)))
        return np.flatnonzero(np.isin(self._labels(split, np.arange(self.size(split))), classes))

    def take(self, split: str, positions) -> Split:
        positions = np.asarray(positions, dtype=np.int64)
        self.taken.append((split, positions))
        pixels = (positions[:, None] * 37 + np.arange(256)) % 256                   # (B, 256)
        return Split(torch.from_numpy(pixels.astype(np.uint8)).reshape(-1, 1, 16, 16),
                     torch.from_numpy(self._labels(split, positions)))

    def batches(self, split: str, **_):
        raise AssertionError(f"a specialist scanned the whole {split} split")

    def describe(self) -> dict:
        return {"name": self.name}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run dir holding an untrained generalist for 9 classes of 1 x 16 x 16 images."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    spec = {"name": "cnn", "num_classes": K, "in_channels": 1, "image_size": 16, "width": 0.25, "depth": 1.0}
    model = create_model(spec["name"], **{k: v for k, v in spec.items() if k != "name"})
    (run / "generalist").mkdir()
    save_model(run / "generalist" / "model", model, {"model": spec, "class_names": list(CountingSource.class_names)})
    return run


def test_a_streaming_source_is_sent_as_itself_whatever_its_size():
    sizes = []
    for n in (100_000, 1_000_000):      # both pickle as 4-byte ints
        source = CountingSource(n)
        descriptor = source_descriptor(source, ("train", "holdout"))
        assert descriptor is source and open_descriptor(descriptor) is source
        sizes.append(len(pickle.dumps(descriptor)))
    assert sizes[0] == sizes[1] < 1_000
    assert source.taken == [] and source.positions_asked == []


def test_in_memory_data_is_sent_as_the_arrays_of_the_splits_read():
    data = create_dataset("hierarchy", seed=0, num_superclasses=3, classes_per_superclass=3,
                          train_per_class=4, holdout_per_class=2, test_per_class=1, image_size=16)
    descriptor = source_descriptor(InMemorySource(data), ("train", "holdout"))
    assert sorted(descriptor) == ["holdout_images", "holdout_labels", "train_images", "train_labels"]
    assert descriptor["train_images"] is data.train.images
    opened = open_descriptor(descriptor)
    assert opened.size("train") == 36 and opened.size("holdout") == 18 and opened.size("test") == 0
    np.testing.assert_array_equal(opened.class_positions("holdout", [2, 5]),
                                  np.flatnonzero(np.isin(data.holdout.labels.numpy(), [2, 5])))
    assert torch.equal(opened.take("train", [3, 1]).images, data.train.images[[3, 1]])


def test_a_specialist_reads_its_group_and_the_sampled_rest_only(run_dir, tmp_path):
    source = CountingSource(3_000)
    settings = SpecialistsConfig(epochs=1, num_batches=3, batch_size=8, eval_batch_size=64)
    job = SpecialistJob(group_id=0, classes=GROUP, names=tuple(str(c) for c in GROUP),
                        group_dir=str(tmp_path / "group_000"), run_dir=str(run_dir), seed=0, settings=settings)
    summary = train_specialist(job, source)

    assert sorted(source.positions_asked) == [("holdout", GROUP), ("train", GROUP)]
    train = [p for split, p in source.taken if split == "train"]
    assert [len(p) for p in train] == [8, 8, 8], "one take per batch, nothing else of the train split"
    for positions in train:
        assert np.isin(source._labels("train", positions), GROUP).sum() == 4   # half in the group
    (holdout,) = [p for split, p in source.taken if split == "holdout"]
    inside = np.isin(source._labels("holdout", holdout), GROUP)
    assert inside.sum() == 100 and len(holdout) == 200                         # 300 holdout examples
    assert summary["pi_m"] == 1_000 / 3_000
