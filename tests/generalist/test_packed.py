"""Packed shards: the format, PackedSource against the in-memory data it was packed from,
streaming for data-parallel ranks, resuming a pack, and damaged or missing data."""

import hashlib
import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import generalist.data.stream as stream
from generalist.data import DataBundle, DataError, Split, create_dataset
from generalist.data.packed import PackedSource
from generalist.data.packed_format import ClassIndex, encode_index
from generalist.data.packed_write import pack_source
from generalist.data.source import ExampleSource, InMemorySource


def _bundle(n: int = 60, k: int = 4, channels: int = 1) -> DataBundle:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, channels, 5, 5), generator=gen, dtype=torch.uint8)
    labels = torch.arange(n) % k
    train = Split(images, labels)
    return DataBundle("toy", tuple(f"c{i}" for i in range(k)), train, train.subset(range(13)),
                      train.subset(range(30, 37)), info={"planted": [0, 0, 1, 1]})


def _pack(bundle: DataBundle, root, lines=None, **kwargs) -> dict:
    kwargs = {"shard_size": 16, "row_group_size": 4, **kwargs}
    return pack_source(InMemorySource(bundle), str(root), origin={"src": "toy", "options": {}, "seed": 0},
                       progress=(lines.append if lines is not None else lambda line: None), **kwargs)


def test_index_layout_by_hand():
    index = ClassIndex(encode_index(np.array([2, 0, 2, 1, 0]), 3), 3)
    assert index.offsets.tolist() == [0, 2, 3, 5]
    assert index.by_class.tolist() == [1, 4, 3, 0, 2]
    assert index.counts().tolist() == [2, 1, 2]
    assert index.positions(np.array([2, 0])).tolist() == [0, 1, 2, 4]
    with pytest.raises(DataError, match="not all in"):
        index.positions(np.array([3]))


def test_manifest_and_shards(tmp_path):
    manifest = _pack(_bundle(), tmp_path)
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk == manifest and manifest["complete"] and manifest["encoding"] == "png"
    assert manifest["image_shape"] == [1, 5, 5]
    train = manifest["splits"]["train"]
    assert [s["records"] for s in train["shards"]] == [16, 16, 16, 12]
    assert train["class_counts"] == [15, 15, 15, 15]
    shard = pq.ParquetFile(tmp_path / "train-00001.parquet")
    assert shard.metadata.num_row_groups == 4 and shard.schema_arrow.names == ["id", "label", "image"]
    table = shard.read()
    assert table.column("id").to_pylist() == list(range(16, 32))
    assert table.column("label").to_pylist() == [i % 4 for i in range(16, 32)]
    test_ids = pq.read_table(tmp_path / "test-00000.parquet").column("id").to_pylist()
    assert test_ids == list(range(60 + 13, 60 + 13 + 7))     # ids run on across splits


def test_source_equals_the_data_it_was_packed_from(tmp_path):
    bundle = _bundle(channels=3)
    _pack(bundle, f"file://{tmp_path}")
    source, memory = PackedSource(f"file://{tmp_path}"), InMemorySource(bundle)
    assert isinstance(source, ExampleSource)
    assert (source.name, source.class_names, source.image_shape) == ("toy", bundle.class_names, (3, 5, 5))
    assert source.info == {"planted": [0, 0, 1, 1]}
    for split in ("train", "holdout", "test"):
        assert source.size(split) == memory.size(split)
        assert np.array_equal(source.class_counts(split), memory.class_counts(split))
        assert np.array_equal(source.class_positions(split, [1, 3]), memory.class_positions(split, [3, 1]))
    got = source.take("train", [59, 0, 17, 18, 2])
    assert torch.equal(got.images, bundle.train.images[[59, 0, 17, 18, 2]])
    assert got.labels.tolist() == [3, 0, 1, 2, 2]
    whole = list(source.batches("train", batch_size=16, shuffle=False))
    assert [len(y) for _, y in whole] == [16, 16, 16, 12]
    assert torch.equal(torch.cat([x for x, _ in whole]), bundle.train.images)
    source.class_positions("test", [0])
    assert pickle.loads(pickle.dumps(source))._indexes == {}        # each process maps its own index
    loaded = create_dataset("packed", root=str(tmp_path))
    assert loaded.describe()["splits"] == bundle.describe()["splits"]


def test_shuffle_is_seeded_and_visits_every_record_once(tmp_path):
    bundle = _bundle()
    _pack(bundle, tmp_path)
    source = PackedSource(str(tmp_path), buffer_size=8)

    def epoch_ids(seed, epoch):
        batches = list(source.encoded_batches("train", batch_size=10, shuffle=True, seed=seed, epoch=epoch))
        return np.concatenate([r.origin[:, 0] * 16 + r.origin[:, 1] for _, r in batches]).tolist()

    first = epoch_ids(0, 0)
    assert sorted(first) == list(range(60)) and first != list(range(60))
    assert epoch_ids(0, 0) == first and epoch_ids(0, 1) != first and epoch_ids(1, 0) != first


def test_ranks_get_equal_disjoint_batches(tmp_path):
    _pack(_bundle(), tmp_path)                        # train shards of 16, 16, 16, 12 records
    source = PackedSource(str(tmp_path), buffer_size=8)
    parts = [list(source.encoded_batches("train", batch_size=12, shuffle=True, seed=4, epoch=1, rank=r,
                                         world_size=3)) for r in range(3)]
    # 60 records in shard order, 20 contiguous ones per rank -> 20 // (12 // 3) = 5 batches of 4
    assert [len(p) for p in parts] == [5, 5, 5]
    assert all(len(r) == 4 for part in parts for _, r in part)
    seen = [tuple(o) for part in parts for _, r in part for o in r.origin.tolist()]
    assert len(seen) == len(set(seen)) == 60
    again = list(source.encoded_batches("train", batch_size=12, shuffle=True, seed=4, epoch=1, rank=1,
                                        world_size=3))
    assert [r.origin.tolist() for _, r in again] == [r.origin.tolist() for _, r in parts[1]]


def test_uneven_shards_still_give_every_rank_half_the_records():
    # one big shard and one small one: each rank gets 2,500 records, not 4,096 and 904
    pieces = [stream.rank_pieces([4096, 904], [1, 0], r, 2) for r in (0, 1)]
    assert pieces[0] == [stream.Piece(1, 0, 904), stream.Piece(0, 0, 1596)]
    assert pieces[1] == [stream.Piece(0, 1596, 4096)]
    assert stream.batches_per_rank([4096, 904], [1, 0], 256, 2) == 2500 // 128


def test_streaming_holds_a_bounded_number_of_records(tmp_path, monkeypatch):
    """Counts the records alive in the shuffle buffer and the batcher: bounded by the buffer plus a
    row group and a batch, far below the split's 400 records."""
    gen = torch.Generator().manual_seed(1)
    split = Split(torch.randint(0, 256, (400, 1, 4, 4), generator=gen, dtype=torch.uint8), torch.arange(400) % 5)
    bundle = DataBundle("big", tuple("abcde"), split, split.subset(range(5)), split.subset(range(5)))
    _pack(bundle, tmp_path, shard_size=50, row_group_size=10)
    peak = [0]
    original = stream.Records.join

    def counting_join(parts):
        joined = original(parts)
        peak[0] = max(peak[0], len(joined))
        return joined

    monkeypatch.setattr(stream.Records, "join", staticmethod(counting_join))
    source = PackedSource(str(tmp_path), buffer_size=30)
    total = sum(len(y) for _, y in source.batches("train", batch_size=20, shuffle=True, seed=0))
    assert total == 400
    assert 30 <= peak[0] <= 30 + 10 + 20


def test_resume_rewrites_only_the_damaged_shard(tmp_path):
    bundle = _bundle()
    _pack(bundle, tmp_path)
    damaged = tmp_path / "train-00002.parquet"
    damaged.write_bytes(damaged.read_bytes()[:-40])
    untouched = tmp_path / "train-00001.parquet"
    before = untouched.stat().st_mtime_ns
    lines = []
    _pack(bundle, tmp_path, lines)
    written = [line for line in lines if " written" in line]
    assert len(written) == 1 and "train-00002.parquet" in written[0]
    assert sum("kept (checksum matches)" in line for line in lines) == 5     # 4 + 1 + 1 shards
    assert untouched.stat().st_mtime_ns == before
    assert torch.equal(PackedSource(str(tmp_path)).take("train", np.arange(60)).images, bundle.train.images)


def test_other_options_rewrite_everything(tmp_path):
    _pack(_bundle(), tmp_path)
    lines = []
    _pack(_bundle(), tmp_path, lines, shard_size=20)
    assert any("other data or options" in line for line in lines)
    assert not any("kept" in line for line in lines)


def test_class_in_test_but_not_train_is_refused(tmp_path):
    bundle = _bundle()
    only_zero = bundle.train.subset(bundle.train.labels != 3)
    lacking = DataBundle("toy", bundle.class_names, only_zero, bundle.holdout.subset(bundle.holdout.labels != 3),
                         bundle.test)
    with pytest.raises(DataError, match=r"\['c3'\] have images in the test split but none in train"):
        _pack(lacking, tmp_path)
    assert not (tmp_path / "manifest.json").exists()


def test_checksum_mismatch_names_the_shard(tmp_path):
    _pack(_bundle(), tmp_path)
    shard = tmp_path / "train-00001.parquet"
    table = pq.read_table(shard)
    pq.write_table(table.slice(0, 15), shard, row_group_size=4)   # a valid file, other content
    source = PackedSource(str(tmp_path))
    with pytest.raises(DataError, match=r"train-00001\.parquet is damaged: it does not match its checksum.*"
                                        r"re-run `specdistill data pack toy "):
        list(source.batches("train", batch_size=8, shuffle=False))


def test_truncated_shard_names_the_shard_and_row_groups(tmp_path):
    _pack(_bundle(), tmp_path)
    shard = tmp_path / "train-00003.parquet"
    shard.write_bytes(shard.read_bytes()[:100])
    source = PackedSource(str(tmp_path))
    with pytest.raises(DataError, match=r"train-00003\.parquet is damaged: its row group\(s\) \[0\] cannot "
                                        r"be read.*re-run `specdistill data pack toy .* to rewrite it"):
        source.take("train", [49])


def test_corrupt_record_names_shard_row_group_and_record(tmp_path):
    _pack(_bundle(), tmp_path)
    shard = tmp_path / "test-00000.parquet"
    table = pq.read_table(shard)
    images = table.column("image").to_pylist()
    images[5] = b"not a png"
    table = table.set_column(2, "image", pa.array(images, type=pa.binary()))
    pq.write_table(table, shard, row_group_size=4)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["splits"]["test"]["shards"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"test-00000\.parquet is damaged: its record 5 \(row group 1\) does "
                                        r"not decode"):
        list(PackedSource(str(tmp_path)).batches("test", batch_size=4, shuffle=False))


def test_missing_or_unreachable_storage(tmp_path):
    with pytest.raises(DataError, match=r"no packed data at .*specdistill data pack SRC"):
        PackedSource(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"cannot open the storage 'nosuch://bucket/set'.*file://, s3://"):
        PackedSource("nosuch://bucket/set")
    with pytest.raises(DataError, match="needs root="):
        create_dataset("packed")
    _pack(_bundle(), tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["complete"] = False
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="did not finish; re-run `specdistill data pack toy"):
        PackedSource(str(tmp_path))
