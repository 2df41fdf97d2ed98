"""A run on packed data never loads the data set into memory, through the ensemble stage with the
soft-target cache and the same-compute baseline; the cache it streams is the in-memory one."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from generalist.data import DataBundle, Split, create_dataset
from generalist.data.source import InMemorySource
from orchestration import pipeline
from orchestration.cli import main
from orchestration.config import load_config
from orchestration.soft_cache import build_cache, data_identity, split_labels
from specialists.ensemble import SoftTargetCache

HIERARCHY = ("num_superclasses=3", "classes_per_superclass=3", "train_per_class=12", "holdout_per_class=4",
             "test_per_class=4", "image_size=8")
RUN = ("data.name=packed", "data.options={}", "specialists.epochs=1", "specialists.batch_size=32",
       "specialists.finetune=head", "ensemble.batch_size=16", "ensemble.cache.shard_size=40",
       "ensemble.cache.actors=2")


def _tiny_source() -> InMemorySource:
    """Train labels [2, 0, 2, 1]: 3 classes, no holdout or test examples."""
    images = torch.arange(4 * 4, dtype=torch.uint8).view(4, 1, 2, 2)
    empty = Split(torch.zeros((0, 1, 2, 2), dtype=torch.uint8), torch.zeros(0, dtype=torch.int64))
    train = Split(images, torch.tensor([2, 0, 2, 1]))
    return InMemorySource(DataBundle("tiny", ("a", "b", "c"), train, empty, empty))


def test_labels_and_identity_from_a_source_without_reading_images():
    source, config = _tiny_source(), load_config(None, [])
    assert split_labels(source, "train").tolist() == [2, 0, 2, 1]
    identity = data_identity(config, "train", source)
    assert identity == data_identity(config, "train", source.split("train"))
    expected = hashlib.sha256(np.array([2, 0, 2, 1], dtype="<i8").tobytes()).hexdigest()
    assert (identity["n_examples"], identity["labels_sha256"], identity["split"]) == (4, expected, "train")


def test_a_source_of_another_size_than_the_identity_is_refused(tmp_path):
    source, config = _tiny_source(), load_config(None, [])
    identity = {**data_identity(config, "train", source), "n_examples": 5}
    with pytest.raises(ValueError, match="has 4 examples but the data identity says 5"):
        build_cache(tmp_path / "run", source, tmp_path / "cache", identity=identity)


@pytest.fixture
def no_materialising(monkeypatch):
    """Every call that would load the whole data set into memory, recorded and refused."""
    calls: list[str] = []

    def refuse(config):
        calls.append(config.data.name)
        raise AssertionError("a stage loaded the whole data set into memory")

    monkeypatch.setattr(pipeline, "_load_data", refuse)
    return calls


def test_packed_run_to_the_ensemble_stage_never_loads_the_data(tiny_args, workdir, no_materialising):
    packed = workdir / "packed"
    options = [arg for option in HIERARCHY for arg in ("--option", option)]
    assert main(["data", "pack", "hierarchy", str(packed), *options, "--shard-size", "50",
                 "--row-group-size", "8"]) == 0
    assert main(["run", *tiny_args(*RUN, f"data.root={packed}"), "--to", "ensemble"]) == 0
    assert no_materialising == []

    run = workdir / "run"
    assert json.loads((run / "specialists" / "same_compute" / "model.json").read_text())["same_compute"]["budget"] > 0
    assert "same_compute_top1" in json.loads((run / "ensemble" / "evaluation.json").read_text())
    # The streamed cache is byte for byte the one built from the same split held in memory, and
    # carries the identity the in-memory split gives.
    config = load_config(run / "config.yaml")
    train = create_dataset("packed", root=str(packed)).train
    streamed = SoftTargetCache(run / "ensemble" / "cache")
    identity = data_identity(config, "train", train)
    streamed.check_compatible(streamed.class_names, identity)
    assert streamed.manifest["data"] == identity and len(streamed) == len(train) == 108
    assert [s["count"] for s in streamed.manifest["shards"]] == [40, 40, 28]
    build_cache(run, train.images, workdir / "in-memory", identity=identity, shard_size=40, batch_size=16)
    in_memory = SoftTargetCache(workdir / "in-memory")
    for mine, theirs in zip(streamed.manifest["shards"], in_memory.manifest["shards"], strict=True):
        assert mine["sha256"] == theirs["sha256"]
