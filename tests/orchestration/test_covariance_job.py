"""The clustering holdout pass (orchestration.covariance_job): its merged block statistics equal
one in-memory accumulator over the same predictions, dense and sparse, and the stage's pass over
a streaming source on Ray Data actors equals its in-process pass over the same examples."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from rich.console import Console

from clustering import CovarianceAccumulator, SparseCoPredictionAccumulator
from clustering.confusion import ConfusionAccumulator
from generalist.data import create_dataset
from generalist.data.source import InMemorySource
from generalist.models import create_model
from orchestration.checkpoints import save_model
from orchestration.config import load_config
from orchestration.covariance_job import (
    HoldoutPartial,
    PassSettings,
    block_starts,
    local_statistics,
)
from orchestration.parallel import connect
from orchestration.stages.clustering import _holdout_pass

K, BATCH = 9, 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A run dir holding an untrained generalist for 9 classes, the data, and every holdout
    example's prediction computed here in one go."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    spec = {"name": "cnn", "num_classes": K, "in_channels": 1, "image_size": 16, "width": 0.25, "depth": 1.0}
    model = create_model(spec["name"], **{k: v for k, v in spec.items() if k != "name"}).eval()
    (run / "generalist").mkdir()
    save_model(run / "generalist" / "model", model, {"model": spec, "class_names": [str(c) for c in range(K)]})
    data = create_dataset("hierarchy", seed=0, num_superclasses=3, classes_per_superclass=3,
                          train_per_class=4, holdout_per_class=11, test_per_class=1, image_size=16)
    with torch.no_grad():
        probs = torch.softmax(model(data.holdout.images.float() / 255).double(), dim=1).numpy()  # (N, K)
    half_of = (np.arange(len(data.holdout)) * 7 % 5 < 2).astype(np.uint8)  # (N,) an uneven split
    connect(local_num_cpus=2)
    return {"run": run, "model": model, "source": InMemorySource(data), "probs": probs,
            "labels": data.holdout.labels.numpy(), "half_of": half_of}


def _expected(probs: np.ndarray, labels: np.ndarray, half_of: np.ndarray):
    """The in-memory accumulators over all predictions, in batches of 10."""
    cov = CovarianceAccumulator(K)
    halves = [(ConfusionAccumulator(K), CovarianceAccumulator(K)) for _ in range(2)]
    for start in range(0, len(probs), 10):
        p, y, h = probs[start:start + 10], labels[start:start + 10], half_of[start:start + 10]
        cov.update(p)
        for which, (confusion, copred) in enumerate(halves):
            if (h == which).any():
                confusion.update(p[h == which], y[h == which])
                copred.update(p[h == which])
    return cov, halves


def test_block_starts_cover_the_split_in_whole_batches():
    block, starts = block_starts(99, PassSettings(K, BATCH), actors=2)
    assert block == 16 and starts == [0, 16, 32, 48, 64, 80, 96]     # ceil(99 / 8) = 13 -> one batch
    block, starts = block_starts(1000, PassSettings(K, BATCH), actors=2)
    assert block == 128 and starts == list(range(0, 1000, 128))      # ceil(1000 / 8) = 125 -> 8 batches


def test_local_pass_equals_the_in_memory_accumulators(setup):
    """The blocks an actor scores, merged in order here, against one accumulator each."""
    partial = local_statistics(setup["model"], setup["source"], settings=PassSettings(K, BATCH),
                               half_of=setup["half_of"], device=torch.device("cpu"))
    cov, halves = _expected(setup["probs"], setup["labels"], setup["half_of"])
    assert partial.count == len(setup["labels"]) == 99
    np.testing.assert_allclose(partial.covariance(), np.cov(setup["probs"], rowvar=False), rtol=0, atol=1e-12)
    np.testing.assert_allclose(partial.covariance(), cov.covariance(), rtol=0, atol=1e-12)
    for got, (confusion, _) in zip(partial.confusions(), halves, strict=True):
        np.testing.assert_allclose(got, confusion.confusion(), rtol=0, atol=1e-12)
    for got, (_, copred) in zip(partial.copredictions(), halves, strict=True):
        np.testing.assert_allclose(got, copred.covariance() + np.outer(copred.mean(), copred.mean()),
                                   rtol=0, atol=1e-12)
    codes, counts = np.unique(setup["labels"] * K + setup["probs"].argmax(axis=1), return_counts=True)
    hard = partial.hard_counts()
    np.testing.assert_array_equal(hard["true"] * K + hard["predicted"], codes)
    np.testing.assert_array_equal(hard["count"], counts)


def test_a_streaming_source_is_scored_on_ray_data_like_in_memory_data(setup):
    """The stage's pass over a source that is not in memory runs on Ray Data actors (2 here)
    and gives the statistics of the in-process pass."""

    class Streamed:  # defined here: Ray ships it to the actors by value
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            if name == "inner":
                raise AttributeError(name)
            return getattr(self.inner, name)

    config = load_config(None, ["run.device=cpu", f"clustering.batch_size={BATCH}", "ray.local_num_cpus=2"])
    ctx = SimpleNamespace(config=config, run_dir=SimpleNamespace(path=setup["run"]), device=torch.device("cpu"),
                          console=Console(file=io.StringIO()))
    streamed = _holdout_pass(ctx, Streamed(setup["source"]), K)
    in_memory = _holdout_pass(ctx, setup["source"], K)
    assert "on 2 Ray Data actors" in ctx.console.file.getvalue() and "in this process" in ctx.console.file.getvalue()
    np.testing.assert_allclose(streamed.cov, np.cov(setup["probs"], rowvar=False), rtol=0, atol=1e-12)
    for got, expected in ((streamed.confusion, in_memory.confusion), (streamed.copred, in_memory.copred)):
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    for key, value in in_memory.hard_counts.items():
        np.testing.assert_array_equal(streamed.hard_counts[key], value)


def test_sparse_blocks_equal_the_sparse_accumulator(setup):
    """The blocks an actor scores, merged in order here (the Ray Data pass runs this code)."""
    partial = local_statistics(setup["model"], setup["source"], settings=PassSettings(K, BATCH, sparse_top_k=3),
                               half_of=None, device=torch.device("cpu"))
    expected = SparseCoPredictionAccumulator(K, top_k=3)
    expected.update(setup["probs"])
    assert partial.confusions() == [] and partial.copredictions() == []
    np.testing.assert_allclose(partial.covariance().toarray(), expected.matrix().toarray(), rtol=0, atol=1e-12)


def test_merging_counts_adds_the_examples_of_each_code():
    a, b = HoldoutPartial.empty(PassSettings(2, 4)), HoldoutPartial.empty(PassSettings(2, 4))
    a.add(np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([0, 0]), np.array([0, 1]))  # codes 0, 1
    b.add(np.array([[0.3, 0.7], [0.6, 0.4]]), np.array([0, 1]), np.array([0, 0]))  # codes 1, 2
    a.merge(b)
    assert a.count == 4
    assert a.hard_counts()["true"].tolist() == [0, 0, 1] and a.hard_counts()["predicted"].tolist() == [0, 1, 0]
    assert a.hard_counts()["count"].tolist() == [1, 2, 1]
    np.testing.assert_allclose(a.confusions()[0], [[0.9 + 0.3, 0.1 + 0.7], [0.6, 0.4]])
    np.testing.assert_allclose(a.confusions()[1], [[0.2, 0.8], [0.0, 0.0]])
