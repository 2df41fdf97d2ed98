"""The generalist stage end to end through the `specdistill` CLI entry point."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mlflow.tracking import MlflowClient

from generalist.train import native_cpu_bf16
from orchestration.artifacts import load_generalist
from orchestration.cli import main


def _runs(uri: str):
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("specdistill")
    return client, client.search_runs([exp.experiment_id])


def test_run_trains_logs_and_then_skips(tiny_args, workdir, capsys):
    args = tiny_args()
    assert main(["run", *args]) == 0
    out = capsys.readouterr().out
    assert "generalist test top1" in out and "mlflow run id:" in out and "parameters" in out
    run_dir = workdir / "run"
    manifest = json.loads((run_dir / "generalist" / "manifest.json").read_text())
    assert manifest["stage"] == "generalist"
    assert set(manifest["outputs"]) == {"model.safetensors", "model.json", "metrics.json"}
    assert manifest["details"]["data"]["num_classes"] == 9
    assert 0.0 <= manifest["metrics"]["test_top1"] <= 1.0
    assert (run_dir / "config.yaml").exists()

    client, runs = _runs(f"sqlite:///{workdir / 'mlflow.db'}")
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.tags["specdistill.stage"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert len(parent) == 1 and set(children) >= {"generalist", "clustering", "specialists"}
    assert all(c.data.tags["mlflow.parentRunId"] == parent[0].info.run_id for c in children.values())
    child = [children["generalist"]]
    assert parent[0].data.params["generalist.epochs"] == "2"
    assert child[0].data.params["data.name"] == "hierarchy"
    history = client.get_metric_history(child[0].info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(child[0].info.run_id)}
    assert {"metrics.json", "model.json", "manifest.json"} <= artifacts

    assert main(["run", *args]) == 0
    out = capsys.readouterr().out
    assert "skip generalist" in out and "skip clustering" in out and "skip specialists" in out
    _, runs_after = _runs(f"sqlite:///{workdir / 'mlflow.db'}")
    assert len(runs_after) == len(runs), "a skipped stage must not create MLflow runs"


def test_changing_a_stage_key_reruns_it_other_keys_do_not(tiny_args, capsys):
    assert main(["generalist", *tiny_args()]) == 0
    capsys.readouterr()
    assert main(["generalist", *tiny_args("tracking.experiment=elsewhere")]) == 0
    assert "skip generalist" in capsys.readouterr().out
    assert main(["generalist", *tiny_args("generalist.optimizer.lr=0.02")]) == 0
    out = capsys.readouterr().out
    assert "stage generalist (config changed)" in out and "skip" not in out


def test_cpu_bf16_trains_every_stage_in_bf16_and_retrains_when_changed(tiny_args, capsys):
    assert main(["run", *tiny_args("run.cpu_bf16=true", "specialists.epochs=1", "specialists.same_compute=false")]) == 0
    out = capsys.readouterr().out
    if native_cpu_bf16():
        assert "training in bf16 mixed precision" in out
        assert "students train in bf16 mixed precision" in out
    else:
        assert "training in float32 (this CPU has no native bf16)" in out
    assert "bf16 mixed precision on CPUs with native bf16" in out  # the specialists' line
    assert main(["run", *tiny_args("run.cpu_bf16=false"), "--to", "generalist"]) == 0
    out = capsys.readouterr().out
    assert "training in float32\n" in out
    assert "stage generalist (config changed)" in out and "skip" not in out


def test_from_stage_reruns_it_and_everything_after(tiny_args, capsys):
    assert main(["run", *tiny_args(), "--to", "specialists"]) == 0
    capsys.readouterr()
    assert main(["run", *tiny_args(), "--from", "clustering", "--to", "specialists"]) == 0
    out = capsys.readouterr().out
    assert "skip generalist" in out
    assert "stage clustering (--from clustering" in out and "stage specialists (--from clustering" in out


def test_corrupted_final_checkpoint_is_detected_and_rebuilt(tiny_args, workdir, capsys):
    assert main(["run", *tiny_args(), "--to", "generalist"]) == 0
    weights = workdir / "run" / "generalist" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()
    assert main(["run", *tiny_args(), "--to", "generalist"]) == 0
    assert "model.safetensors changed or corrupt" in capsys.readouterr().out
    model, meta = load_generalist(workdir / "run")
    assert meta["model"]["num_classes"] == 9 and len(meta["class_names"]) == 9


def test_corrupted_epoch_checkpoint_retrains_from_scratch(tiny_args, workdir, capsys):
    assert main(["run", *tiny_args(), "--to", "generalist"]) == 0
    stage = workdir / "run" / "generalist"
    (stage / "manifest.json").unlink()
    latest = json.loads((stage / "checkpoints" / "latest.json").read_text())["dir"]
    last = stage / "checkpoints" / latest / "model.safetensors"
    last.write_bytes(last.read_bytes()[: len(last.read_bytes()) // 2])
    capsys.readouterr()
    assert main(["run", *tiny_args(), "--to", "generalist"]) == 0
    out = capsys.readouterr().out
    assert "cannot resume" in out and "training from scratch" in out and "epoch 1/2" in out


def test_finished_epochs_are_resumed_not_repeated(tiny_args, workdir, capsys):
    assert main(["run", *tiny_args(), "--to", "generalist"]) == 0
    (workdir / "run" / "generalist" / "manifest.json").unlink()
    capsys.readouterr()
    assert main(["run", *tiny_args(), "--to", "generalist"]) == 0
    out = capsys.readouterr().out
    assert "resuming after epoch 2" in out and "epoch 1/2" not in out


def test_nan_loss_stops_with_epoch_and_step(tiny_args, workdir, capsys):
    code = main(["run", *tiny_args("generalist.optimizer.lr=1e12", "generalist.optimizer.warmup_epochs=0")])
    err = capsys.readouterr().err
    assert code == 1
    assert "epoch" in err and "step" in err
    assert not (workdir / "run" / "generalist" / "manifest.json").exists()


def test_missing_data_root_says_how_to_get_data(tiny_args, workdir, capsys):
    code = main(["run", *tiny_args("data.name=cifar100", f"data.root={workdir / 'nope'}",
                                   "data.options={}")])
    err = capsys.readouterr().err
    assert code == 2 and "glyphs" in err and str(workdir / "nope") in err


def test_class_count_that_does_not_match_the_data(tiny_args, workdir, capsys):
    code = main(["run", *tiny_args("data.name=glyphs", "data.options={num_classes: 100000}")])
    err = capsys.readouterr().err
    assert code == 2 and "100000" in err


def test_unknown_config_key_from_the_cli(capsys):
    assert main(["run", "generalist.epohcs=2"]) == 2
    assert "did you mean 'generalist.epochs'" in capsys.readouterr().err


def test_unreachable_tracking_server_fails_before_training(tiny_args, workdir, capsys):
    code = main(["run", *tiny_args(uri="http://127.0.0.1:9")])
    assert code == 1
    assert "unreachable" in capsys.readouterr().err
    assert not (workdir / "run" / "generalist" / "checkpoints").exists()


def test_tracking_against_a_real_mlflow_server(tiny_args, mlflow_server, capsys):
    assert main(["run", *tiny_args(uri=mlflow_server)]) == 0
    client, runs = _runs(mlflow_server)
    child = next(r for r in runs if r.data.tags.get("specdistill.stage") == "generalist")
    assert child.info.status == "FINISHED"
    assert child.data.metrics["test_top1"] >= 0.0
    assert len(client.get_metric_history(child.info.run_id, "holdout_loss")) == 2
    local = Path(client.download_artifacts(child.info.run_id, "model.json"))
    assert json.loads(local.read_text())["model"]["num_classes"] == 9


def test_stage_run_left_running_after_its_manifest_is_closed_on_resume(finished_run, workdir, capsys):
    """Killed between a stage's manifest and the end of its MLflow run: the resumed pipeline
    skips the stage (it finished) and closes that run, so no run is left RUNNING."""
    shutil.copytree(finished_run["path"], workdir / "run")
    shutil.copy(finished_run["root"] / "mlflow.db", workdir / "mlflow.db")
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    run_id = json.loads((workdir / "run" / "clustering" / "mlflow.json").read_text())["mlflow_run_id"]
    client = MlflowClient(tracking_uri=uri)
    client.set_terminated(run_id, status="RUNNING")
    assert client.get_run(run_id).info.status == "RUNNING"
    args = [*finished_run["args"], f"run.dir={workdir / 'run'}", f"tracking.uri={uri}"]
    assert main(["run", *args, "--to", "ensemble"]) == 0
    out = capsys.readouterr().out
    assert "skip clustering" in out and "closed the MLflow run of clustering" in out
    assert out.count("closed the MLflow run") == 1  # the other stages' runs were closed already
    assert client.get_run(run_id).info.status == "FINISHED"
    assert main(["run", *args, "--to", "ensemble"]) == 0
    assert "closed the MLflow run" not in capsys.readouterr().out
