"""Data-parallel training on Ray Train: two gloo workers on a local Ray, failures, fail-fast checks."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from orchestration.cli import main
from orchestration.config_sections import RayTrainConfig
from orchestration.ray_train import SINGLE, Parallel, RayTrainError, check_cluster, on_ray_train

EPOCHS = ("generalist.epochs=4", "generalist.patience=4")



def _stage_runs(uri: str, stage: str):
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("specdistill")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`specdistill.stage` = '{stage}'")
    return client, runs


def test_which_settings_train_on_ray_train():
    assert not on_ray_train(RayTrainConfig())
    assert on_ray_train(RayTrainConfig(workers=2))
    assert on_ray_train(RayTrainConfig(use_gpu=True))


def test_steps_per_epoch_one_worker_keeps_the_last_batch_many_drop_it():
    assert SINGLE.steps_per_epoch(216, 32) == 7           # 6 full batches + one of 24
    assert Parallel(1, 2, on_ray=True).steps_per_epoch(216, 32) == 6
    with pytest.raises(RayTrainError, match="ray.train.workers"):
        Parallel(0, 2, on_ray=True).steps_per_epoch(20, 32)


def test_more_workers_or_gpus_than_the_cluster_has_fail_fast(local_ray):
    check_cluster(RayTrainConfig(workers=2))               # 2 x 1 CPU fits
    with pytest.raises(RayTrainError, match="ray.train.workers=3.*ray.local_num_cpus"):
        check_cluster(RayTrainConfig(workers=3))
    with pytest.raises(RayTrainError, match="ray.train.use_gpu=false"):
        check_cluster(RayTrainConfig(workers=1, use_gpu=True))


def test_use_gpu_on_a_cpu_cluster_stops_the_stage_with_the_keys_to_change(local_ray, tiny_args, workdir, capsys):
    code = main(["generalist", *tiny_args("ray.train.use_gpu=true")])
    err = capsys.readouterr().err
    assert code == 2 and "ray.train.use_gpu=false" in err
    assert not (workdir / "run" / "generalist" / "manifest.json").exists()


def test_two_workers_hold_the_same_weights_and_match_one_worker(local_ray, tiny_args, workdir):
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    assert main(["generalist", *tiny_args(*EPOCHS, "ray.train.workers=2")]) == 0
    assert main(["generalist", *tiny_args(*EPOCHS, run_dir="single")]) == 0
    two = json.loads((workdir / "run" / "generalist" / "metrics.json").read_text())
    one = json.loads((workdir / "single" / "generalist" / "metrics.json").read_text())
    # Same global batch and schedule; they differ by the dropped last batch (216 = 6 x 32 + 24)
    # and BatchNorm statistics taken per rank over 16 examples instead of 32.
    assert two["epochs_trained"] == 4
    assert abs(two["test_top1"] - one["test_top1"]) <= 0.2
    assert {p.name for p in (workdir / "run" / "generalist").glob("model.*")} == {"model.safetensors", "model.json"}

    client, runs = _stage_runs(uri, "generalist")
    assert len(runs) == 2                                   # one per run directory
    parallel = next(r for r in runs if "specdistill.ray_train.weights_sha256" in r.data.tags)
    single = next(r for r in runs if r.info.run_id != parallel.info.run_id)
    digests = parallel.data.tags["specdistill.ray_train.weights_sha256"].split(",")
    assert len(digests) == 2 and digests[0] == digests[1]
    history = {r: client.get_metric_history(r.info.run_id, "train_loss") for r in (parallel, single)}
    assert sorted(m.step for m in history[parallel]) == [1, 2, 3, 4]
    first = [next(m.value for m in history[r] if m.step == 1) for r in (parallel, single)]
    assert abs(first[0] - first[1]) < 0.05                 # same model, data and learning rate
    assert "test_top1" in parallel.data.metrics


def test_throughput_of_one_worker_in_the_driver(tiny_args, workdir):
    from orchestration.config import load_config
    from orchestration.ray_train_bench import generalist_throughput

    config = load_config(None, tiny_args("generalist.epochs=3", "generalist.patience=3"))
    result = generalist_throughput(config, workers=1, cpus_per_worker=1, run_dir=workdir / "bench")
    metrics = json.loads((workdir / "bench" / "generalist" / "metrics.json").read_text())
    assert result["epochs"] == 3 == metrics["epochs_trained"]
    assert result["images_per_s"] > 0 and 0 < result["holdout_loss"] < 10
    with pytest.raises(ValueError, match="fresh run_dir"):
        generalist_throughput(config, workers=1, cpus_per_worker=1, run_dir=workdir / "bench")
