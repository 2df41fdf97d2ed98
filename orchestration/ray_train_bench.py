"""What data-parallel training buys: the generalist of a config trained on N workers x C CPUs.

    from orchestration.config import load_config
    generalist_throughput(load_config("configs/quickstart.yaml"), workers=2, cpus_per_worker=1,
                          run_dir=Path("/tmp/bench-2x1"))
    # {"images_per_s": ..., "holdout_loss": ..., "epochs": ...}

``images_per_s`` is the training throughput of the whole worker group (the mean over the epochs
after the first, so Ray Train's start-up, process-group set-up and first-epoch warm-up are not
counted); ``holdout_loss`` is the last epoch's. One worker trains in the driver process with
``cpus_per_worker`` torch threads, as ``ray.train.workers=1`` does.
"""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient
from rich.console import Console

from orchestration.config import Config, validate_config
from orchestration.pipeline import run_pipeline
from orchestration.rundir import RunDir
from orchestration.stages import STAGES
from orchestration.tracking import resolve_tracking_uri


def scaled_config(config: Config, *, workers: int, cpus_per_worker: float, run_dir: Path) -> Config:
    """``config`` training on ``workers`` x ``cpus_per_worker`` CPUs in its own run directory."""
    raw = config.model_dump(mode="json")
    raw["run"] = {**raw["run"], "dir": str(run_dir), "num_threads": max(1, int(cpus_per_worker))}
    raw["ray"] = {**raw["ray"], "train": {**raw["ray"]["train"], "workers": workers,
                                          "cpus_per_worker": cpus_per_worker}}
    return validate_config(raw, source="benchmark")


def generalist_throughput(config: Config, *, workers: int, cpus_per_worker: float,
                          run_dir: Path) -> dict[str, float]:
    """Train the generalist of ``config`` in the new ``run_dir`` and return its training
    images/s and final holdout loss (see the module docstring)."""
    if RunDir(run_dir).manifest_path("generalist").exists():
        raise ValueError(f"the generalist in {run_dir} finished earlier and would not train again; "
                         "give the benchmark a fresh run_dir")
    scaled = scaled_config(config, workers=workers, cpus_per_worker=cpus_per_worker, run_dir=run_dir)
    outcome = run_pipeline(scaled, STAGES, only="generalist", console=Console(quiet=True))
    run_id = outcome.manifests["generalist"].details["mlflow_run_id"]
    client = MlflowClient(tracking_uri=resolve_tracking_uri(scaled.tracking.uri))
    speeds = sorted(client.get_metric_history(run_id, "examples_per_s"), key=lambda m: m.step)
    losses = sorted(client.get_metric_history(run_id, "holdout_loss"), key=lambda m: m.step)
    timed = speeds[1:] or speeds
    return {"images_per_s": sum(m.value for m in timed) / len(timed),
            "holdout_loss": losses[-1].value, "epochs": float(len(losses))}
