"""The soft-target cache built with Ray Data (orchestration.soft_cache) from the session's tiny
finished run (9 classes, 216 train images), read back memory-mapped (specialists.ensemble), and
wired into the ensemble stage."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from generalist.data import create_dataset
from orchestration.artifacts import cache_dir
from orchestration.config import ConfigError, load_config
from orchestration.ensemble_api import Ensemble
from orchestration.files import sha256_file
from orchestration.parallel import connect
from orchestration.soft_cache import build_cache, data_identity
from specialists.ensemble import (
    BUILD_COMMAND,
    CacheCorruptError,
    CacheMismatchError,
    SoftTargetCache,
)

SHARD = 50  # 216 examples -> shards of 50, 50, 50, 50, 16


@pytest.fixture(scope="module")
def teacher(finished_run):
    """The finished run's config, data (train split), identity and the ensemble's q of it."""
    run = finished_run["path"]
    config = load_config(run / "config.yaml")
    data = create_dataset(config.data.name, root=config.data.root, seed=config.run.seed,
                          **config.data.options)
    connect(local_num_cpus=2)
    ensemble = Ensemble.load(run)
    return {"run": run, "config": config, "data": data, "ensemble": ensemble,
            "identity": data_identity(config, "train", data.train),
            "q": ensemble.soft_targets(data.train.images)}


def _build(teacher, out, **options):
    return build_cache(teacher["run"], teacher["data"].train.images, out,
                       identity=teacher["identity"], shard_size=SHARD, batch_size=16, **options)


@pytest.fixture(scope="module")
def dense(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("dense")
    _build(teacher, out, num_actors=2)
    return SoftTargetCache(out)


@pytest.fixture(scope="module")
def topk(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("topk")
    _build(teacher, out, num_actors=1, top_k=3, dense_max_classes=0)
    return SoftTargetCache(out)


def _soften(q: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(log q / T) in float64; entries of q that are 0 stay 0."""
    return torch.softmax(q.double().log() / temperature, dim=1)


def test_dense_round_trip(dense, teacher):
    q, n = teacher["q"], 216
    manifest = dense.manifest
    assert (dense.layout, dense.num_classes, len(dense)) == ("dense", 9, n)
    assert dense.class_names == list(teacher["data"].class_names)
    assert [s["count"] for s in manifest["shards"]] == [50, 50, 50, 50, 16]
    assert [s["first_id"] for s in manifest["shards"]] == [0, 50, 100, 150, 200]
    assert manifest["data"] == teacher["identity"] and manifest["split"] == "train"
    assert manifest["targets"].startswith("stores q at T=1")
    assert manifest["teacher"]["run_dir"] == str(teacher["run"].resolve())
    assert manifest["teacher"]["generalist_sha256"] == sha256_file(teacher["run"] / "generalist" / "model.safetensors")
    # float16 log q, read back and renormalised: each entry within |log q| * 2**-11 (relative) of q.
    got = dense.targets(torch.arange(n))
    assert got.dtype == torch.float32 and got.shape == (n, 9)
    torch.testing.assert_close(got.double(), q, rtol=2e-3, atol=1e-7)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(n), rtol=0, atol=1e-5)
    # Example order across shards and actors: shard ids are consecutive, rows match q row by row.
    ids = np.concatenate([shard["ids"] for shard in dense._shards])
    assert ids.tolist() == list(range(n))
    assert (got.argmax(dim=1) == q.argmax(dim=1)).all()
    # Random access, any order, repeats; __getitem__ is the T = 1 row.
    idx = torch.tensor([215, 3, 3, 100, 49, 50, 0])
    torch.testing.assert_close(dense.targets(idx), got[idx])
    torch.testing.assert_close(dense[-1], got[215])
    # Soften at read time: softmax(log q / T) of the stored q; close to the ensemble's own at T.
    stored = torch.from_numpy(np.concatenate([s["values"] for s in dense._shards]).astype(np.float32)).exp()
    for temperature in (0.5, 4.0):
        soft = dense.targets(torch.arange(n), temperature)
        torch.testing.assert_close(soft.double(), _soften(stored, temperature), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(soft.double(), teacher["ensemble"].soft_targets(
            teacher["data"].train.images, temperature), rtol=5e-3, atol=1e-6)
    # Memory-mapped, bytes per example (9 float16 log q + an int64 id), checksums in the manifest.
    assert all(isinstance(a, np.memmap) for shard in dense._shards for a in shard.values())
    assert dense.bytes_per_example == manifest["bytes_per_example"] == 9 * 2 + 8
    shard = manifest["shards"][1]
    assert shard["sha256"]["values"] == sha256_file(dense.path / shard["files"]["values"])
    dense.verify()


def test_dataloader(dense):
    batches = list(DataLoader(dense, batch_size=64, shuffle=False))
    assert [len(b) for b in batches] == [64, 64, 64, 24]
    torch.testing.assert_close(torch.cat(batches), dense.targets(torch.arange(len(dense))))
    # Workers started with spawn get a picklable cache that maps the files again.
    assert dense.__getstate__() == {"path": str(dense.path)}


def test_topk_round_trip(topk, teacher):
    q, n, k = teacher["q"], 216, 3
    assert (topk.layout, topk.top_k, len(topk)) == ("topk", k, n)
    assert len(topk.manifest["shards"]) == 5
    values = np.concatenate([s["values"] for s in topk._shards])
    classes = np.concatenate([s["classes"] for s in topk._shards])
    residual = np.concatenate([s["residual"] for s in topk._shards])
    assert (values.dtype, classes.dtype, residual.dtype) == (np.float16, np.int32, np.float32)
    top_q, top_ids = q.topk(k, dim=1)
    assert (torch.from_numpy(classes.astype(np.int64)) == top_ids).all()
    torch.testing.assert_close(torch.from_numpy(values).double().exp(), top_q, rtol=2e-3, atol=1e-7)
    # The residual is the exact mass of the 6 classes not kept (to float32).
    torch.testing.assert_close(torch.from_numpy(residual).double(), 1 - top_q.sum(dim=1),
                               rtol=1e-5, atol=1e-7)
    # Read back: stored probabilities + the residual spread over the other 6 classes, normalised.
    expected = (torch.from_numpy(residual).double() / (9 - k))[:, None].repeat(1, 9)
    expected.scatter_(1, top_ids, torch.from_numpy(values).float().exp().double())
    for temperature in (1.0, 3.0):
        got = topk.targets(torch.arange(n), temperature)
        torch.testing.assert_close(got.sum(dim=1), torch.ones(n), rtol=0, atol=1e-5)
        torch.testing.assert_close(got.double(), _soften(expected, temperature), rtol=1e-5, atol=1e-7)
    # Exact where q really is top-3 plus near-uniform rest; always the same top-1 as the ensemble.
    assert (topk.targets(torch.arange(n)).argmax(dim=1) == q.argmax(dim=1)).all()
    assert topk.bytes_per_example == 3 * 2 + 3 * 4 + 4 + 8
    assert all(isinstance(a, np.memmap) for shard in topk._shards for a in shard.values())
    topk.verify()


def test_read_errors(dense):
    with pytest.raises(ValueError, match="temperature"):
        dense.targets(torch.arange(3), 0.0)
    with pytest.raises(IndexError, match=r"\[0, 216\)"):
        dense.targets(torch.tensor([0, 216]))
    with pytest.raises(IndexError):
        dense[216]


def test_check_compatible(dense, teacher):
    names, identity = list(teacher["data"].class_names), teacher["identity"]
    dense.check_compatible(names, identity)
    swapped = [names[1], names[0], *names[2:]]
    with pytest.raises(CacheMismatchError, match="another class list") as err:
        dense.check_compatible(swapped, identity)
    assert BUILD_COMMAND in str(err.value) and isinstance(err.value, ValueError)
    with pytest.raises(CacheMismatchError, match=r"another class list \(9 classes, not 8\)"):
        dense.check_compatible(names[:8], identity)
    other = {**identity, "name": "glyphs", "options": {**identity["options"], "image_size": 32}}
    with pytest.raises(CacheMismatchError, match="another data set") as err:
        dense.check_compatible(names, other)
    assert "differing: image_size" in str(err.value)
    holdout = data_identity(teacher["config"], "holdout", teacher["data"].holdout)
    with pytest.raises(CacheMismatchError, match="another split.*another number of examples"):
        dense.check_compatible(names, holdout)
    with pytest.raises(CacheMismatchError, match="other labels"):
        dense.check_compatible(names, {**identity, "labels_sha256": "0" * 64})


def test_missing_or_half_written(dense, tmp_path):
    with pytest.raises(FileNotFoundError, match="no soft-target cache.*specdistill run CONFIG --from ensemble"):
        SoftTargetCache(tmp_path / "nothing")
    half = tmp_path / "half"
    shutil.copytree(dense.path, half)
    (half / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="half-written"):
        SoftTargetCache(half)


def test_corrupt_shard(dense, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(dense.path, copy)
    values = copy / "shard_00002.values.npy"
    np.save(values, np.zeros((50, 9), np.float16), allow_pickle=False)
    with pytest.raises(CacheCorruptError, match="sha256"):
        SoftTargetCache(copy).verify()
    np.save(values, np.zeros((49, 9), np.float16), allow_pickle=False)
    with pytest.raises(CacheCorruptError, match="the manifest says"):
        SoftTargetCache(copy)


def test_build_edge_cases(teacher, tmp_path):
    with pytest.raises(ConfigError, match="ensemble.cache.gpus_per_actor"):
        _build(teacher, tmp_path / "gpu", gpus_per_actor=1.0)
    empty = teacher["data"].train.subset([])
    build_cache(teacher["run"], empty.images, tmp_path / "empty",
                identity=data_identity(teacher["config"], "train", empty))
    cache = SoftTargetCache(tmp_path / "empty")
    assert len(cache) == 0 and cache.targets(torch.zeros(0, dtype=torch.long)).shape == (0, 9)


def test_ensemble_stage_writes_cache(finished_run, teacher):
    run = finished_run["path"]
    stage = json.loads((run / "ensemble" / "manifest.json").read_text())
    path = cache_dir(run)
    assert stage["outputs"]["cache/manifest.json"] == sha256_file(path / "manifest.json")
    assert {"evaluation.json", "table4.json", "table4.md"} <= set(stage["outputs"])
    evaluation = json.loads((run / "ensemble" / "evaluation.json").read_text())
    assert evaluation["n_examples"] == 72 and stage["metrics"]["ensemble_top1"] == evaluation["ensemble_top1"]
    assert stage["metrics"]["cache_bytes_per_example"] == 26 and stage["metrics"]["cache_examples_per_s"] > 0
    cache = SoftTargetCache(path)
    cache.check_compatible(teacher["data"].class_names, teacher["identity"])
    cache.verify()
    assert cache.manifest["split"] == "train" and len(cache.manifest["shards"]) == 1
    torch.testing.assert_close(cache.targets(torch.arange(216)).double(), teacher["q"], rtol=2e-3, atol=1e-7)


def test_a_single_block_starts_a_single_actor(teacher, tmp_path):
    """Ray Data warns when actors outnumber blocks (nothing a user can act on): none idle here."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_cache(teacher["run"], teacher["data"].train.images, tmp_path / "one", identity=teacher["identity"],
                    shard_size=4096, batch_size=4096, num_actors=2)
    assert not [w for w in caught if "concurrent actors" in str(w.message)]
    assert len(SoftTargetCache(tmp_path / "one")) == 216
