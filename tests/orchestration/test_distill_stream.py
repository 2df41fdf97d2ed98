"""The distill stage on streamed data: batches with their positions from every kind of source, the
labels behind the cache's identity, and the stage on a packed set (in the driver and on two Ray
Train workers) without ever loading the data set into memory."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from distill.train import iterate_indexed_batches, source_indexed_batches
from generalist.data import create_dataset
from generalist.data.folder_source import FolderSource
from generalist.data.packed import PackedSource
from generalist.data.source import InMemorySource
from orchestration.cli import main
from orchestration.pipeline import StageContext
from orchestration.teachers import labels_only

HIERARCHY = ["--option", "num_superclasses=3", "--option", "classes_per_superclass=3", "--option",
             "train_per_class=24", "--option", "holdout_per_class=8", "--option", "test_per_class=8",
             "--option", "image_size=16"]
HINT = ("distill.losses={hint: 1.0}", "distill.hint_layers=[blocks.1, blocks.1]", "distill.student=cnn")


def _pack(out, *extra: str) -> str:
    assert main(["data", "pack", "hierarchy", str(out), *HIERARCHY, "--shard-size", "50",
                 "--row-group-size", "8", *extra]) == 0
    return str(out)


def _all_positions(source, world_size: int, **read) -> list[np.ndarray]:
    """Every rank's positions over one epoch, each checked against ``take`` of those positions."""
    seen = []
    for rank in range(world_size):
        batches = source.indexed_batches("train", rank=rank, world_size=world_size, **read)
        for (images, labels, ids), (plain, _) in zip(batches, source.batches(
                "train", rank=rank, world_size=world_size, **read), strict=True):
            taken = source.take("train", ids.numpy())
            assert ids.dtype == torch.int64 and images.shape[0] == ids.shape[0]
            assert torch.equal(taken.images, images) and torch.equal(taken.labels, labels)
            assert torch.equal(plain, images)                       # the batches of batches()
        seen.append(np.concatenate([ids.numpy() for *_, ids in source.indexed_batches(
            "train", rank=rank, world_size=world_size, **read)]))
    return seen


def test_packed_positions_name_the_records_each_rank_reads(workdir, capsys):
    source = PackedSource(_pack(workdir / "packed"), buffer_size=16)
    n = source.size("train")                                         # 216 records in 5 shards
    read = {"batch_size": 8, "shuffle": True, "seed": 3, "epoch": 1}
    one = _all_positions(source, 1, **read)[0]
    assert sorted(one.tolist()) == list(range(n))                   # every record once
    two = _all_positions(source, 2, **read)
    assert len(two[0]) == len(two[1]) == 216 // 8 * 4              # 27 global batches of 4 + 4
    assert not set(two[0].tolist()) & set(two[1].tolist())          # the ranks are disjoint
    assert _all_positions(source, 1, batch_size=8, shuffle=False)[0].tolist() == list(range(n))


def test_in_memory_positions_are_those_distill_always_used():
    data = create_dataset("hierarchy", seed=0, num_superclasses=2, classes_per_superclass=2,
                          train_per_class=5, holdout_per_class=1, test_per_class=1, image_size=8)
    source = InMemorySource(data)
    for world_size in (1, 2):
        for rank in range(world_size):
            read = {"batch_size": 6, "shuffle": True, "seed": 7, "epoch": 2, "rank": rank,
                    "world_size": world_size}
            old = list(iterate_indexed_batches(data.train.images, data.train.labels, **read))
            new = list(source_indexed_batches(source, "train", **read))
            assert len(old) == len(new) == (4 if world_size == 1 else 3)   # 20 = 3 x 6 + 2
            for a, b in zip(old, new, strict=True):
                assert torch.equal(a.ids, b.ids) and torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    first = next(source_indexed_batches(source, "train", batch_size=6, shuffle=False))
    assert first.ids.tolist() == [0, 1, 2, 3, 4, 5]
    assert torch.equal(first.x, data.train.images[:6].float() / 255.0)


def test_folder_positions_follow_the_split_order(workdir):
    rng = np.random.default_rng(0)
    for k, name in enumerate(("ant", "bee", "cow")):
        (workdir / "tree" / name).mkdir(parents=True)
        for i in range(10):
            pixels = np.clip(rng.normal(60 + 70 * k, 20, (10, 10)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(workdir / "tree" / name / f"{i}.png")
    source = FolderSource(str(workdir / "tree"), image_size=8, channels=1)
    n = source.size("train")
    assert sorted(_all_positions(source, 1, batch_size=4, shuffle=True, seed=1)[0].tolist()) == list(range(n))
    two = _all_positions(source, 2, batch_size=4, shuffle=True, seed=1)
    assert len(two[0]) == len(two[1]) == n // 4 * 2 and not set(two[0].tolist()) & set(two[1].tolist())


def test_labels_only_recovers_every_label_without_pixels(workdir):
    source = PackedSource(_pack(workdir / "packed"))
    data = create_dataset("packed", root=str(workdir / "packed"))
    for split in ("train", "test"):
        recovered = labels_only(source, split)
        assert recovered.images.shape == (source.size(split), 0, 0, 0)
        assert torch.equal(recovered.labels, getattr(data, split).labels)


# ---------------------------------------------------------------------- the stage, streamed


@pytest.fixture(scope="module")
def packed_run(tmp_path_factory, pipeline_args):
    """A tiny run on a packed copy of the tiny hierarchy, finished up to the ensemble stage (its
    soft-target cache included); treat it as read-only."""
    root = tmp_path_factory.mktemp("packed-run")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    packed = ("data.name=packed", f"data.root={_pack(root / 'packed')}", "data.options={}")

    def args(run_dir, *extra: str) -> list[str]:
        return pipeline_args(run_dir, uri, *packed, *extra)

    cwd = os.getcwd()
    os.chdir(root)                                  # MLflow's default artifact folder lands here
    try:
        assert main(["run", *args(root / "run"), "--to", "ensemble"]) == 0
    finally:
        os.chdir(cwd)
    return {"path": root / "run", "args": args, "uri": uri}


@pytest.fixture
def never_materialised(monkeypatch):
    """``StageContext.data`` (which loads the whole data set) made to fail."""
    def refuse(self):
        raise AssertionError("the distill stage loaded the whole data set (ctx.data())")
    monkeypatch.setattr(StageContext, "data", refuse)


def _rows(run_dir) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads((run_dir / "distill" / "results.json").read_text())["rows"]}


def test_distill_stage_on_packed_data_reads_only_through_the_source(packed_run, never_materialised,
                                                                    workdir, capsys):
    run_dir = workdir / "run"
    shutil.copytree(packed_run["path"], run_dir)
    extra = (*HINT, "distill.baselines=true", "distill.scheme=mutual", "distill.schemes.group_size=2",
             "distill.data_free.enabled=true", "distill.data_free.generator_steps=2",
             "distill.data_free.steps_per_epoch=2", "distill.data_free.batch_size=8",
             "distill.register_model=true")
    assert main(["run", *packed_run["args"](run_dir, *extra), "--only", "distill"]) == 0
    out = capsys.readouterr().out
    assert "on 216 train examples" in out and "extra loss hint" in out and "registered version 1" in out
    rows = _rows(run_dir)
    assert list(rows) == ["generalist", "ensemble", "same_compute", "student", "hard_labels",
                          "generalist_kd", "mutual_1", "mutual_2", "data_free"]
    assert rows["student"]["teacher"] == "ensemble (cache)"        # the cache matched the packed data
    for row in rows.values():
        assert 0 <= row["top1"] <= row["top5"] <= 1 and row["latency_ms"] > 0
    meta = json.loads((run_dir / "distill" / "student.json").read_text())
    assert meta["data"]["format"] == "packed" and len(meta["class_names"]) == 9


def test_a_student_row_on_two_ray_train_workers_streams_packed_data(packed_run, never_materialised,
                                                                   workdir, capsys):
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        run_dir = workdir / "run"
        shutil.copytree(packed_run["path"], run_dir)
        extra = (*HINT, "distill.baselines=false", "ray.train.workers=2")
        assert main(["run", *packed_run["args"](run_dir, *extra), "--only", "distill"]) == 0
    finally:
        ray.shutdown()
    assert "student: data-parallel on Ray Train, 2 workers x 1 CPUs" in capsys.readouterr().out
    assert 0 <= _rows(run_dir)["student"]["top1"] <= 1
    client = MlflowClient(tracking_uri=packed_run["uri"])
    runs = client.search_runs([client.get_experiment_by_name("specdistill").experiment_id],
                              filter_string="tags.`specdistill.stage` = 'distill'")
    digests = [r.data.tags["specdistill.ray_train.student.weights_sha256"].split(",") for r in runs
               if "specdistill.ray_train.student.weights_sha256" in r.data.tags]
    assert len(digests) == 1 and len(digests[0]) == 2 and digests[0][0] == digests[0][1]
