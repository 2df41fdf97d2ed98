"""``generalist.clean_epochs``: after early stopping the generalist goes on from its best weights
without augmentation, so a baseline trained on augmented images is not left short of what more
training on clean images gives it (which would otherwise pass for a specialist gain)."""

from __future__ import annotations

import json

import pytest

import orchestration.stages.generalist as generalist_stage
from orchestration.artifacts import load_generalist
from orchestration.cli import main
from orchestration.report import baseline_lines


@pytest.fixture
def augment_kinds(monkeypatch):
    """The augmentation kind of every training epoch's loader, in order."""
    seen: list[str] = []
    real = generalist_stage.loader

    def spy(source, split, **kwargs):
        if split == "train":
            seen.append(kwargs["augment"].kind)
        return real(source, split, **kwargs)

    monkeypatch.setattr(generalist_stage, "loader", spy)
    return seen


def test_clean_epochs_follow_the_augmented_ones_from_the_best_weights(tiny_args, workdir, augment_kinds, capsys):
    args = tiny_args("generalist.clean_epochs=2", "generalist.patience=5", "data.augment.kind=affine")
    assert main(["run", *args, "--to", "generalist"]) == 0
    out = capsys.readouterr().out
    assert "then up to 2 epochs without augmentation from the best weights" in out
    assert "epoch 3 (no augmentation)" in out and "epoch 4 (no augmentation)" in out
    assert augment_kinds[:2] != ["none", "none"] and augment_kinds[2:] == ["none", "none"]
    _, meta = load_generalist(workdir / "run")
    assert meta["metrics"]["epochs_trained"] == 4
    assert meta["metrics"]["epoch_limit"] == "generalist.clean_epochs=2"  # the limit that ends this loop
    latest = json.loads((workdir / "run" / "generalist" / "checkpoints" / "latest.json").read_text())
    assert latest["dir"].endswith("0004")


@pytest.mark.parametrize("off", ["generalist.augment=false", "data.augment.kind=auto"])  # hierarchy declares none
def test_without_augmentation_there_is_no_clean_phase(tiny_args, workdir, augment_kinds, capsys, off):
    assert main(["run", *tiny_args("generalist.clean_epochs=2", off), "--to", "generalist"]) == 0
    assert "without augmentation" not in capsys.readouterr().out
    assert augment_kinds == ["none", "none"]
    assert load_generalist(workdir / "run")[1]["metrics"]["epoch_limit"] == "generalist.epochs=2"


@pytest.mark.parametrize(("limit", "knob"), [("generalist.clean_epochs=10", "generalist.clean_epochs"),
                                             ("generalist.epochs=40", "generalist.epochs"),
                                             (None, "generalist.epochs")])  # a run recorded before the limit was
def test_a_generalist_still_improving_at_its_limit_is_reported_with_the_knob_that_ended_it(limit, knob):
    report = {"baselines": {"still_improving": True, "early_stopped": False, "epochs_trained": 42,
                            "epoch_limit": limit}}
    line = baseline_lines(report)[0]
    assert line.startswith("The generalist is NOT converged") and "42 epochs in all" in line
    assert line.endswith(f"(raise {knob}).")
    assert (limit or "generalist.epochs") in line


def test_a_run_stopped_in_the_clean_phase_resumes_in_it(tiny_args, workdir, monkeypatch, capsys):
    args = [*tiny_args("generalist.clean_epochs=2", "generalist.patience=5", "data.augment.kind=affine"), "--to", "generalist"]
    kinds: list[str] = []
    real = generalist_stage.loader

    def dies_in_epoch_4(source, split, **kwargs):
        if split == "train":
            kinds.append(kwargs["augment"].kind)
            if len(kinds) == 4 and crash:
                raise KeyboardInterrupt  # the job killed during its second clean epoch
        return real(source, split, **kwargs)

    monkeypatch.setattr(generalist_stage, "loader", dies_in_epoch_4)
    crash = True
    assert main(["run", *args]) != 0
    assert "re-run the same command to resume" in capsys.readouterr().err
    crash, kinds[:] = False, []
    capsys.readouterr()
    assert main(["run", *args]) == 0
    out = capsys.readouterr().out
    assert "resuming after epoch 3" in out
    assert "then up to" not in out  # the phase began before the interruption and is not begun again
    assert kinds == ["none"]
    assert load_generalist(workdir / "run")[1]["metrics"]["epochs_trained"] == 4
