"""InMemorySource: the order of iterate_batches for one worker, disjoint equal parts for several."""

import numpy as np
import pytest
import torch

from generalist.data import DataBundle, DataError, Split
from generalist.data.source import ExampleSource, InMemorySource
from generalist.train import iterate_batches


def _bundle(n: int = 50, k: int = 5) -> DataBundle:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 4, 4), generator=gen, dtype=torch.uint8)
    labels = torch.arange(n) % k
    split = Split(images, labels)
    return DataBundle("toy", tuple(f"c{i}" for i in range(k)), split, split.subset(range(10)),
                      split.subset(range(7)))


def test_one_worker_sees_the_batches_of_iterate_batches():
    bundle = _bundle()
    source = InMemorySource(bundle)
    assert isinstance(source, ExampleSource)
    got = list(source.batches("train", batch_size=16, shuffle=True, seed=3, epoch=2))
    want = list(iterate_batches(bundle.train.images, bundle.train.labels, batch_size=16,
                                shuffle=True, seed=3, epoch=2))
    assert [len(y) for _, y in got] == [16, 16, 16, 2]
    for (xi, yi), (xf, yf) in zip(got, want, strict=True):
        assert torch.equal(xi.float() / 255, xf) and torch.equal(yi, yf)


def test_two_workers_split_every_global_batch_and_drop_the_incomplete_one():
    source = InMemorySource(_bundle())
    parts = [list(source.batches("train", batch_size=16, shuffle=True, seed=1, epoch=0,
                                 rank=r, world_size=2)) for r in (0, 1)]
    assert [len(p) for p in parts] == [3, 3]
    whole = list(source.batches("train", batch_size=16, shuffle=True, seed=1, epoch=0))
    for step in range(3):
        joined = torch.cat([parts[0][step][1], parts[1][step][1]])
        assert torch.equal(joined, whole[step][1])
        assert all(len(parts[r][step][1]) == 8 for r in (0, 1))


def test_counts_positions_and_bad_arguments():
    source = InMemorySource(_bundle())
    assert source.class_counts("train").tolist() == [10] * 5
    assert source.class_positions("holdout", [1, 3]).tolist() == [1, 3, 6, 8]
    assert np.array_equal(source.take("test", [2, 0]).labels.numpy(), [2, 0])
    with pytest.raises(DataError, match="divisible by 3"):
        next(source.batches("train", batch_size=16, shuffle=False, rank=0, world_size=3))
    with pytest.raises(DataError, match="unknown split"):
        source.size("validation")
