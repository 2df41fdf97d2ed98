"""The soft-target cache's format, writer and reader (specialists/ensemble/cache_*.py) on hand-made
probabilities, without Ray: what is stored, what is read back at a temperature, the manifest."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from specialists.ensemble import CacheLayout, SoftTargetCache, write_cache, write_shards
from specialists.ensemble.cache_format import log_values, probabilities

IDENTITY = {"name": "mine", "options": {}, "seed": 0, "split": "train", "n_examples": 3, "labels_sha256": ""}
NAMES = ["a", "b", "c", "d", "e"]
# Powers of two (their logarithms are stored in float16); row 1 has an exact zero, row 2 puts all
# its mass on two classes. The stored logarithms keep each probability to |log q| * 2**-11 (relative).
Q = torch.tensor([[0.5, 0.25, 0.125, 0.0625, 0.0625],
                  [0.0, 0.5, 0.25, 0.125, 0.125],
                  [0.75, 0.0, 0.25, 0.0, 0.0]], dtype=torch.float64)


def _soften(q: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(log q / T) in float64; entries of q that are 0 stay 0."""
    return torch.softmax(q.double().log() / temperature, dim=1)


def test_layouts_and_bytes_per_example():
    dense, topk = CacheLayout.choose(5, 2, 8), CacheLayout.choose(5, 2, 4)
    assert (dense.kind, dense.top_k, dense.arrays) == ("dense", 5, ("values", "ids"))
    assert (topk.kind, topk.top_k, topk.arrays) == ("topk", 2, ("values", "classes", "residual", "ids"))
    assert dense.bytes_per_example == 5 * 2 + 8  # float16 log q + int64 id
    assert topk.bytes_per_example == 2 * 2 + 2 * 4 + 4 + 8  # float16 + int32 ids + float32 residual + id
    assert CacheLayout.choose(5, 32, 4).top_k == 5  # never more than K kept
    encoded = topk.encode(Q)
    assert encoded["classes"].tolist() == [[0, 1], [1, 2], [0, 2]]
    assert encoded["values"].dtype == np.float16
    np.testing.assert_allclose(np.exp(encoded["values"].astype(np.float64)),
                               [[0.5, 0.25], [0.5, 0.25], [0.75, 0.25]], rtol=1e-3)
    assert encoded["residual"].tolist() == [0.25, 0.25, 0.0]


def test_dense_round_trip_keeps_zeros_at_every_temperature(tmp_path):
    manifest = write_cache(tmp_path, Q, class_names=NAMES, identity=IDENTITY, teacher={"t": 1}, shard_size=2)
    cache = SoftTargetCache(tmp_path)
    assert (cache.layout, len(cache), [s["count"] for s in manifest["shards"]]) == ("dense", 3, [2, 1])
    got = cache.targets([0, 1, 2])
    torch.testing.assert_close(got, Q.float(), atol=0, rtol=1.5e-3)  # |log q| * 2**-11 at most
    assert torch.equal(got == 0, Q == 0)
    hot = cache.targets([2, 1], 2.0)
    expected = torch.tensor([[0.75 ** 0.5, 0, 0.5, 0, 0], [0, 0.5 ** 0.5, 0.5, 0.125 ** 0.5, 0.125 ** 0.5]])
    torch.testing.assert_close(hot, expected / expected.sum(dim=1, keepdim=True), atol=0, rtol=1e-3)
    assert int((hot == 0).sum()) == 4  # exact zeros stay exactly zero
    torch.testing.assert_close(cache[1], Q[1].float(), atol=0, rtol=1.5e-3)


def test_topk_rows_are_stored_mass_plus_spread_residual(tmp_path):
    write_cache(tmp_path, Q, class_names=NAMES, identity=IDENTITY, teacher={}, top_k=2, dense_max_classes=4)
    cache = SoftTargetCache(tmp_path)
    assert (cache.layout, cache.top_k) == ("topk", 2)
    expected = torch.tensor([[0.5, 0.25, 0.25 / 3, 0.25 / 3, 0.25 / 3],
                             [0.25 / 3, 0.5, 0.25, 0.25 / 3, 0.25 / 3],
                             [0.75, 0.0, 0.25, 0.0, 0.0]])  # no residual: the rest stays exactly 0
    torch.testing.assert_close(cache.targets([0, 1, 2]), expected, atol=0, rtol=1.5e-3)
    for temperature in (1.0, 3.0):
        got = cache.targets([2, 0], temperature)
        torch.testing.assert_close(got.double(), _soften(expected[[2, 0]], temperature), atol=0, rtol=1.5e-3)
        assert got[0, [1, 3, 4]].tolist() == [0.0, 0.0, 0.0]


def test_topk_completion_equals_the_numpy_scatter_of_stored_values(tmp_path):
    """For K > k the completion is the k stored values scattered over residual / (K - k)."""
    gen = torch.Generator().manual_seed(0)
    q = (3 * torch.randn(40, 12, generator=gen, dtype=torch.float64)).softmax(dim=1)
    identity = {**IDENTITY, "n_examples": 40}
    write_cache(tmp_path, q, class_names=[f"c{i}" for i in range(12)], identity=identity, teacher={},
                top_k=4, dense_max_classes=8, shard_size=16)
    cache = SoftTargetCache(tmp_path)
    ids = np.array([39, 0, 17, 17, 5])
    for shard in range(3):
        assert cache._shards[shard]["ids"].tolist() == list(range(16 * shard, min(16 * shard + 16, 40)))
    values, classes, residual = (np.concatenate([s[name] for s in cache._shards])[ids]
                                 for name in ("values", "classes", "residual"))
    expected = np.repeat((residual / 8)[:, None], 12, axis=1)  # (5, 12) float32
    np.put_along_axis(expected, classes.astype(np.int64), probabilities(values).numpy(), axis=1)
    assert torch.equal(cache._gather(torch.from_numpy(ids)), torch.from_numpy(expected))
    torch.testing.assert_close(cache.targets(ids, 2.0).double(), _soften(torch.from_numpy(expected), 2.0),
                               atol=1e-6, rtol=0)


def test_manifest_records_files_checksums_and_identity(tmp_path):
    manifest = write_cache(tmp_path, Q, class_names=NAMES, identity=IDENTITY, teacher={"t": 1}, shard_size=2)
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    assert (manifest["format"], manifest["n_examples"], manifest["top_k"]) == ("specdistill.soft_target_cache", 3, 5)
    assert manifest["data"] == IDENTITY and manifest["teacher"] == {"t": 1} and manifest["class_names"] == NAMES
    shard = manifest["shards"][1]
    assert (shard["first_id"], shard["count"], shard["files"]["ids"]) == (2, 1, "shard_00001.ids.npy")
    digest = hashlib.sha256((tmp_path / shard["files"]["values"]).read_bytes()).hexdigest()
    assert shard["sha256"]["values"] == digest
    assert np.load(tmp_path / shard["files"]["ids"]).tolist() == [2]
    assert not list(tmp_path.glob(".*.tmp"))
    SoftTargetCache(tmp_path).verify()


def test_rows_may_arrive_in_any_order(tmp_path):
    layout = CacheLayout.choose(5, 2, 4)
    batches = [{"id": np.array([2, 0]), **layout.encode(Q[[2, 0]])}, {"id": np.array([1]), **layout.encode(Q[[1]])}]
    write_shards(tmp_path / "shuffled", iter(batches), layout, n=3, shard_size=2, teacher={}, identity=IDENTITY,
                 class_names=NAMES, progress=None, started=0.0)
    write_cache(tmp_path / "ordered", Q, class_names=NAMES, identity=IDENTITY, teacher={}, top_k=2,
                dense_max_classes=4, shard_size=2)
    for name in ("values", "classes", "residual", "ids"):
        for shard in (0, 1):
            file = f"shard_{shard:05d}.{name}.npy"
            assert (tmp_path / "shuffled" / file).read_bytes() == (tmp_path / "ordered" / file).read_bytes()
    with pytest.raises(RuntimeError, match="an example id twice"):
        write_shards(tmp_path / "twice", iter(batches + batches[1:]), layout, n=3, shard_size=2, teacher={},
                     identity=IDENTITY, class_names=NAMES, progress=None, started=0.0)
    with pytest.raises(RuntimeError, match="no soft targets for 1 of 3 examples"):
        write_shards(tmp_path / "short", iter(batches[:1]), layout, n=3, shard_size=2, teacher={},
                     identity=IDENTITY, class_names=NAMES, progress=None, started=0.0)


def test_write_cache_from_another_teacher(tmp_path):
    """Probabilities computed elsewhere go through the same writer, manifest and reader."""
    gen = torch.Generator().manual_seed(0)
    q = (3 * torch.randn(130, 12, generator=gen, dtype=torch.float64)).softmax(dim=1)
    identity = {"name": "mine", "options": {}, "seed": 0, "split": "train", "n_examples": 130,
                "labels_sha256": ""}
    names = [f"c{i}" for i in range(12)]
    manifest = write_cache(tmp_path / "dense", q, class_names=names, identity=identity,
                           teacher={"model": "mine"}, shard_size=40)
    dense = SoftTargetCache(tmp_path / "dense")
    assert (dense.layout, len(dense), len(manifest["shards"])) == ("dense", 130, 4)
    assert dense.manifest["teacher"] == {"model": "mine"} and dense.manifest["class_names"] == names
    torch.testing.assert_close(dense.targets(torch.arange(130)).double(), q, rtol=2e-3, atol=1e-6)
    stored = torch.from_numpy(log_values(q)).double().exp()  # softening acts on the stored values
    torch.testing.assert_close(dense.targets([5, 129], 2.0).double(), _soften(stored[[5, 129]], 2.0),
                               rtol=1e-5, atol=1e-7)
    dense.verify()
    dense.check_compatible(names, identity)
    write_cache(tmp_path / "topk", q.numpy(), class_names=names, identity=identity, teacher={},
                top_k=4, dense_max_classes=8, shard_size=64)
    topk = SoftTargetCache(tmp_path / "topk")
    assert (topk.layout, topk.top_k) == ("topk", 4)
    assert (topk.targets(torch.arange(130)).argmax(dim=1) == q.argmax(dim=1)).all()
    with pytest.raises(ValueError, match=r"q must be \(N=130, K=12\)"):
        write_cache(tmp_path / "bad", q[:, :11], class_names=names, identity=identity, teacher={})
    assert not (tmp_path / "bad").exists()


def test_a_confident_teachers_tail_survives_softening(tmp_path):
    """A confident teacher's tail (1e-8 .. 1e-26 on most classes of a training example) holds a
    good part of the softened mass at T = 4: it is stored, and read back close to float64 softening."""
    K = 320
    logits = torch.cat([torch.tensor([0.0, -5.0]), torch.linspace(-18.0, -60.0, K - 2)]).double()
    q = torch.stack([logits, logits.flip(0)]).softmax(dim=1)
    assert float((q < 6e-8).double().mean()) > 0.99  # float16 probabilities would read these as 0
    identity = {**IDENTITY, "n_examples": 2}
    write_cache(tmp_path, q, class_names=[f"c{i}" for i in range(K)], identity=identity, teacher={})
    got = SoftTargetCache(tmp_path).targets([0, 1], 4.0).double()
    want = _soften(q, 4.0)
    assert bool((got > 0).all())
    assert float(want[0, 2:].sum()) > 0.1  # the mass a cache of float16 probabilities loses
    torch.testing.assert_close(got, want, rtol=5e-3, atol=0)  # |log q| * 2**-11 / T, |log q| <= 60


def test_a_version_1_cache_is_refused_with_the_command_that_rebuilds_it(tmp_path):
    """Version 1 stored probabilities, not their logarithms: reading its values as logarithms
    would give wrong targets, so the reader refuses it and says how to rebuild it."""
    write_cache(tmp_path, Q, class_names=NAMES, identity=IDENTITY, teacher={})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(ValueError, match=r"not a version-2 soft-target cache.*version 1.*rebuild it: "
                                         r"specdistill run CONFIG --from ensemble"):
        SoftTargetCache(tmp_path)
