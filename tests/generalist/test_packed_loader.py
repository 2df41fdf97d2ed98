"""loader(..., workers=n): decoding and augmentation in worker processes, order kept, seeded per batch."""

import pytest
import torch

from generalist.data import DataBundle, Split
from generalist.data.augment import AugmentSpec, augment_batch
from generalist.data.loader import loader
from generalist.data.packed import PackedSource
from generalist.data.packed_write import pack_source
from generalist.data.source import InMemorySource
from generalist.data.splits import derive_seed


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    gen = torch.Generator().manual_seed(0)
    train = Split(torch.randint(0, 256, (45, 1, 6, 6), generator=gen, dtype=torch.uint8), torch.arange(45) % 3)
    bundle = DataBundle("toy", ("a", "b", "c"), train, train.subset(range(6)), train.subset(range(6)))
    root = tmp_path_factory.mktemp("packed")
    pack_source(InMemorySource(bundle), str(root), origin={"src": "toy"}, shard_size=20, row_group_size=5,
                progress=lambda line: None)
    return bundle, PackedSource(str(root), buffer_size=10)


def _all(batches):
    xs, ys = zip(*batches, strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_workers_keep_the_order_of_one_process(packed):
    _, source = packed
    read = {"batch_size": 8, "shuffle": True, "seed": 3, "epoch": 1}
    x0, y0 = _all(loader(source, "train", **read))
    x2, y2 = _all(loader(source, "train", **read, workers=2))
    assert torch.equal(y0, y2) and torch.equal(x0, x2)       # no augmentation: the same batches


def test_augmentation_in_workers_is_seeded_per_batch(packed):
    bundle, source = packed
    spec = AugmentSpec(kind="affine", rotate=15.0, scale=0.1, shift=0.1)
    read = {"batch_size": 8, "shuffle": False, "seed": 3, "epoch": 2, "augment": spec}
    with_two = list(loader(source, "train", **read, workers=2))
    with_one = list(loader(source, "train", **read, workers=1))
    for (a, ya), (b, yb) in zip(with_two, with_one, strict=True):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    images = bundle.train.images.float() / 255
    for index, (x, _) in enumerate(with_two):
        generator = torch.Generator().manual_seed(derive_seed(3, 2, index, 0xA07))
        expected = augment_batch(images[8 * index:8 * index + 8], spec, generator)
        assert torch.allclose(x, expected)


def test_in_memory_sources_work_with_workers(packed):
    bundle, _ = packed
    source = InMemorySource(bundle)
    x0, y0 = _all(loader(source, "train", batch_size=16, shuffle=True, seed=1, workers=0))
    x2, y2 = _all(loader(source, "train", batch_size=16, shuffle=True, seed=1, workers=2))
    assert torch.equal(x0, x2) and torch.equal(y0, y2)
    with pytest.raises(ValueError, match="workers must be >= 0"):
        loader(source, "train", batch_size=16, shuffle=False, workers=-1)


def test_data_parallel_ranks_draw_their_own_augmentation():
    """Two ranks see different examples; the same example on both would still be jittered
    differently: the augmentation seed depends on the rank when there are several."""
    from generalist.data import DataBundle, Split
    from generalist.data.augment import AugmentSpec
    from generalist.data.loader import augment_seed, loader
    from generalist.data.source import InMemorySource

    assert augment_seed(7, 0, 1) == 7
    same = Split(torch.arange(64, dtype=torch.uint8).reshape(1, 1, 8, 8).repeat(8, 1, 1, 1), torch.arange(8) % 2)
    source = InMemorySource(DataBundle("same", ("a", "b"), same, same, same))
    views = [next(loader(source, "train", batch_size=4, shuffle=False, seed=7, rank=r, world_size=2,
                         augment=AugmentSpec(kind="affine")))[0] for r in (0, 1)]
    assert not torch.allclose(views[0], views[1])      # identical images, different draws
