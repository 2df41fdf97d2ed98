"""An unwritable run directory and a disk that fills up mid-run: a clear error, no half-written
manifest, the finished stages intact, and the same command resumes once there is room."""

from __future__ import annotations

import errno
import os

from orchestration import files
from orchestration.cli import main


def test_run_dir_that_cannot_be_created_fails_before_any_training(tiny_args, workdir, capsys):
    blocker = workdir / "a-file"
    blocker.write_text("not a folder")
    assert main(["run", *tiny_args(run_dir="a-file/run")]) == 1
    err = capsys.readouterr().err
    assert "run directory" in err and "is not writable" in err and "run.dir=PATH" in err
    assert not (workdir / "mlflow.db").exists() or "generalist" not in err


def test_disk_full_while_writing_a_manifest(tiny_args, workdir, monkeypatch, capsys):
    args = tiny_args("specialists.epochs=1", "specialists.finetune=head", "ensemble.cache.enabled=false")
    real_replace = os.replace

    def full_disk(src, dst, *a, **kw):
        if str(dst).endswith(os.path.join("ensemble", "manifest.json")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(files.os, "replace", full_disk)
    assert main(["run", *args, "--to", "ensemble"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "nothing was half-written" in err and "re-run" in err
    run = workdir / "run"
    assert not (run / "ensemble" / "manifest.json").exists()
    assert not list(run.rglob("*.tmp")), "a temporary file was left behind"
    for stage in ("generalist", "clustering", "specialists"):
        assert (run / stage / "manifest.json").exists()

    monkeypatch.setattr(files.os, "replace", real_replace)  # space freed: the same command resumes
    assert main(["run", *args, "--to", "ensemble"]) == 0
    out = capsys.readouterr().out
    assert "skip generalist" in out and "skip specialists" in out and "stage ensemble" in out
    assert (run / "ensemble" / "manifest.json").exists()
