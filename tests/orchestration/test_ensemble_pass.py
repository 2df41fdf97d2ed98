"""The ensemble stage's evaluation pass (orchestration.ensemble_pass) on the shared tiny
finished run (9 classes, 72 holdout and 72 test examples, batches of 16): blocks of whole batches
merged in order give the stage's batch-by-batch numbers, and a streaming source scored on 2 Ray
Data actors gives exactly what the in-process pass gives."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from generalist.data import create_dataset
from generalist.data.source import InMemorySource
from orchestration.artifacts import load_ensemble, load_same_compute
from orchestration.config import load_config
from orchestration.ensemble_pass import (
    Pool,
    PredictionPartial,
    Scorer,
    block_starts,
    holdout_nll,
    predict_test,
)
from orchestration.parallel import connect
from specialists.ensemble import ensemble_forward

BATCH, TEMPERATURES = 16, (1.0, 2.0)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def run(finished_run):
    path = finished_run["path"]
    config = load_config(path / "config.yaml")
    data = create_dataset(config.data.name, root=config.data.root, seed=config.run.seed, **config.data.options)
    ensemble = load_ensemble(path, top_n=config.ensemble.top_n, tol=config.ensemble.tol,
                             max_iter=config.ensemble.max_iter).ensemble
    same_compute = load_same_compute(path)[0]
    return {"path": path, "data": data, "source": InMemorySource(data),
            "scorer": Scorer(ensemble, same_compute, BATCH, CPU)}


def _streamed(source: InMemorySource):
    """The same data as a source that is not in memory (as the stage sees a streaming one)."""

    class Streamed:  # defined here: Ray ships it to the actors by value
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            if name == "inner":
                raise AttributeError(name)
            return getattr(self.inner, name)

    return Streamed(source)


def test_block_starts_are_whole_batches():
    assert block_starts(72, 16, actors=2) == (16, [0, 16, 32, 48, 64])     # ceil(72 / 8) = 9 -> 1 batch
    assert block_starts(1000, 16, actors=1) == (256, [0, 256, 512, 768])  # ceil(1000 / 4) = 250 -> 16
    assert block_starts(10**6, 16, actors=1)[0] == 32 * 16                # at most 32 batches a block


def test_in_process_pass_gives_the_batch_by_batch_numbers(run):
    """Blocks merged in order: mean NLL per temperature and the test arrays of one loop over batches."""
    scorer, data = run["scorer"], run["data"]
    nll = holdout_nll(scorer, run["source"], TEMPERATURES, pool=Pool())
    for t in TEMPERATURES:
        total = 0.0
        for start in range(0, len(data.holdout), BATCH):
            x = data.holdout.images[start:start + BATCH].float() / 255
            q = ensemble_forward(replace(scorer.ensemble, specialist_temperature=t), x).q    # (16, 9)
            total -= float(q.gather(1, data.holdout.labels[start:start + BATCH].view(-1, 1)).clamp_min(1e-12).log().sum())
        assert nll[t] == total / 72
    test = predict_test(scorer, run["source"], pool=Pool())
    arrays = test.arrays()
    with torch.no_grad():
        out = ensemble_forward(scorer.ensemble, data.test.images.float() / 255)
        same = scorer.same_compute(data.test.images.float() / 255).argmax(dim=1)
    assert torch.equal(arrays["labels"], data.test.labels) and len(arrays["labels"]) == 72
    assert torch.equal(arrays["combined"], out.q.argmax(dim=1))
    assert torch.equal(arrays["general"], out.p_general.argmax(dim=1))
    assert torch.equal(arrays["n_active"], out.active.sum(dim=1))
    assert torch.equal(arrays["same_compute"], same)
    assert test.unconverged == [] and test.seconds > 0


def test_test_partials_merge_in_order():
    first = PredictionPartial([np.array([3, 1])], [np.array([0, 0])], [np.array([1, 1])], [np.array([2, 0])],
                        [np.array([5, 5])], [1e-3], 0.5)
    second = PredictionPartial([np.array([7])], [np.array([4])], [np.array([6])], [np.array([1])],
                         [np.array([8])], [], 0.25)
    first.merge(second)
    arrays = first.arrays()
    assert arrays["labels"].tolist() == [3, 1, 7] and arrays["same_compute"].tolist() == [5, 5, 8]
    assert arrays["n_active"].tolist() == [2, 0, 1] and first.unconverged == [1e-3] and first.seconds == 0.75


def test_streaming_source_on_two_ray_data_actors_equals_the_in_process_pass(run):
    connect(local_num_cpus=2)
    scorer, streamed, pool = run["scorer"], _streamed(run["source"]), Pool(run["path"], actors=2)
    local = holdout_nll(scorer, run["source"], TEMPERATURES, pool=Pool())
    remote = holdout_nll(scorer, streamed, TEMPERATURES, pool=pool)
    assert list(remote) == list(TEMPERATURES)
    for t in TEMPERATURES:
        assert remote[t] == pytest.approx(local[t], rel=0, abs=1e-9)
    local_test = predict_test(scorer, run["source"], pool=Pool()).arrays()
    remote_test = predict_test(scorer, streamed, pool=pool).arrays()
    for key, value in local_test.items():
        assert torch.equal(remote_test[key], value), key
