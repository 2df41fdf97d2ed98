"""The same-compute baseline through `specdistill run`: the generalist trained on for exactly the
examples all specialists saw, with the recipe `specialists.same_compute_recipe` names, keeping its
epoch with the best holdout top-1 (never below the generalist's)."""

from __future__ import annotations

import json
import shutil

import pytest

from generalist.data import create_dataset
from generalist.data.loader import loader
from generalist.data.source import InMemorySource
from generalist.train import evaluate
from orchestration.artifacts import load_generalist, load_same_compute
from orchestration.cli import main
from orchestration.config import load_config


def _holdout_top1(model, source, batch_size: int) -> float:
    """As the job measures it (its eval batch size, so the same sums)."""
    batches = loader(source, "holdout", batch_size=batch_size, shuffle=False)
    return float(evaluate(model, batches, device="cpu")["top1"])


def _summary(run) -> dict:
    return json.loads((run / "specialists" / "same_compute" / "model.json").read_text())["same_compute"]


def _specialists_seen(run) -> int:
    return sum(json.loads(p.read_text())["metrics"]["examples_seen"]
               for p in (run / "specialists").glob("group_*/model.json"))


def test_the_baseline_spends_the_specialists_budget_with_the_generalists_recipe(finished_run, workdir, capsys):
    run = workdir / "run"
    shutil.copytree(finished_run["path"], run)
    config = load_config(run / "config.yaml")
    summary = _summary(run)
    seen = _specialists_seen(run)
    assert summary["budget"] == seen > 0
    assert summary["recipe"] == "generalist" and summary["lr"] == config.generalist.optimizer.lr
    assert summary["epochs_trained"] == summary["epochs_planned"] >= 1       # the whole budget, no early stop
    assert summary["examples_seen"] == seen

    data = create_dataset(config.data.name, root=config.data.root, seed=config.run.seed, **config.data.options)
    source = InMemorySource(data)
    batch = config.specialists.eval_batch_size
    kept = _holdout_top1(load_same_compute(run)[0], source, batch)
    assert kept == pytest.approx(summary["best_holdout_top1"], abs=1e-6)
    assert kept >= _holdout_top1(load_generalist(run)[0].eval(), source, batch)  # epoch 0 is the generalist

    args = ["run", *finished_run["args"], f"run.dir={run}", f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}"]
    assert main([*args, "specialists.same_compute_recipe=specialists", "--to", "specialists"]) == 0
    out = capsys.readouterr().out
    assert "with the specialists' recipe, lr 0.001" in out and "(epoch 0 = the generalist)" in out
    summary = _summary(run)
    assert summary["recipe"] == "specialists" and summary["lr"] == config.specialists.optimizer.lr
    assert summary["budget"] == _specialists_seen(run)


def test_an_unknown_recipe_is_refused_with_the_choices(tiny_args, capsys):
    assert main(["run", *tiny_args("specialists.same_compute_recipe=generalists")]) != 0
    err = capsys.readouterr().err
    assert "same_compute_recipe" in err and "'generalist'" in err and "'specialists'" in err
