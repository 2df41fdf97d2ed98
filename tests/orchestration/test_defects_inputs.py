"""Inputs a new user gets wrong, through the CLI: each one is a one-line error naming the problem
and the fix (exit code 2 for bad input) found before any run directory or MLflow run exists, or
is read correctly: 16-bit images scaled, not clipped; CIFAR pickles read by an unpickler that
refuses anything but the CIFAR format; one top_k rule for `query` and the HTTP API."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from orchestration.cli import main
from orchestration.serve_protocol import RequestError, parse_options


def _png(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels).save(path, format="PNG")
    return path


# ----------------------------------------------------------------------------- 6: 16-bit images
def test_a_sixteen_bit_png_is_scaled_to_eight_bits_not_clipped(finished_run, workdir, capsys):
    gradient = np.arange(256, dtype=np.uint16).reshape(16, 16)          # 0..255 (1, 16, 16)
    eight = _png(workdir / "eight.png", gradient.astype(np.uint8))
    sixteen = _png(workdir / "sixteen.png", gradient * 257)            # the same image, 16 bits
    assert Image.open(sixteen).mode == "I;16"
    assert main(["query", str(finished_run["path"]), str(eight), str(sixteen), "--top-k", "9", "--json"]) == 0
    answers = json.loads(capsys.readouterr().out)
    same, other = answers[0]["top_k"], answers[1]["top_k"]              # same pixels, same soft targets
    assert [a["class"] for a in same] == [b["class"] for b in other]    # (up to the round-off of
    assert [a["probability"] for a in same] == pytest.approx([b["probability"] for b in other], abs=1e-6)  # batched convs)

    from generalist.data.images import ImageModeError, decode_image

    assert decode_image(sixteen, (1, 16, 16))[0].ravel().tolist() == list(range(256))
    floats = Image.fromarray(np.full((16, 16), 2.5, np.float32))          # mode F beyond [0, 1]
    buffer = io.BytesIO()
    floats.save(buffer, format="TIFF")
    with pytest.raises(ImageModeError, match=r"the image is a floating-point image \(mode F\) with values from 2.5"):
        decode_image(buffer.getvalue(), (1, 16, 16))


# ----------------------------------------------------------------------------- 7: types and limits
def test_top_k_has_one_rule_for_query_and_the_http_api(finished_run, workdir, capsys):
    image = _png(workdir / "a.png", np.zeros((16, 16), np.uint8))
    rule = "top_k must be an integer in [1, 9] (this run has 9 classes), got 100"
    assert main(["query", str(finished_run["path"]), str(image), "--top-k", "100"]) == 2
    assert rule in capsys.readouterr().err
    with pytest.raises(RequestError, match=rule.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        parse_options(100, None, 9)
    assert main(["query", str(finished_run["path"]), str(image), "--top-k", "0"]) == 2
    assert "top_k must be an integer in [1, 9] (this run has 9 classes), got 0" in capsys.readouterr().err
    assert main(["query", str(finished_run["path"]), str(image)]) == 0  # default: 5 classes
    assert len(capsys.readouterr().out.strip().splitlines()) == 6


def test_bad_config_values_are_refused_before_anything_is_written(tiny_args, workdir, capsys):
    assert main(["config", "generalist.epochs=true"]) == 2
    err = capsys.readouterr().err
    assert "generalist.epochs" in err and "not a boolean" in err
    bad_option = "data.options={num_superclasses: 3, classes_per_superclass: 3, bogus: 1}"
    assert main(["config", "data.name=hierarchy", bad_option]) == 2
    err = capsys.readouterr().err
    assert "unknown data.options key(s) bogus for data set 'hierarchy'" in err and "classes_per_superclass" in err
    assert main(["run", *tiny_args(bad_option)]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main(["run", *tiny_args("data.name=hierarhcy")]) == 2
    assert "did you mean 'hierarchy'" in capsys.readouterr().err
    assert not (workdir / "run").exists() and not (workdir / "mlflow.db").exists()  # no run dir, no MLflow run


# ----------------------------------------------------------------------------- 8: no tracebacks
def test_an_unterminated_override_is_a_message(capsys):
    assert main(["config", "data.options={a: 3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: override 'data.options={a: 3': the value is not valid YAML")
    assert "close every bracket" in err and "Traceback" not in err


def test_a_folder_passed_as_an_image_is_a_message(finished_run, workdir, capsys):
    assert main(["query", str(finished_run["path"]), str(workdir)]) == 2
    err = capsys.readouterr().err
    assert f"{workdir} is a folder, not an image file; pass the image files in it" in err


def test_cuda_without_a_gpu_is_a_message_before_the_run_directory(tiny_args, workdir, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["run", *tiny_args("run.device=cuda")]) == 2
    err = capsys.readouterr().err
    assert "run.device=cuda but PyTorch sees no CUDA device" in err and "run.device=cpu" in err
    assert not (workdir / "run").exists()


def test_report_on_a_read_only_run_directory_prints_it_then_says_how_to_save_it(
        finished_run, workdir, capsys, monkeypatch):
    run = workdir / "run"
    shutil.copytree(finished_run["path"], run)
    for name in ("report.md", "accuracy_vs_params.png", "per_group_gain.png"):
        (run / name).unlink(missing_ok=True)
    real_mkstemp = tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):  # noqa: A002 - mkstemp's own keyword
        if dir is not None and Path(dir) == run:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert main(["report", str(run)]) == 1
    out, err = capsys.readouterr()
    assert f"specdistill results: {run}" in out and "Table 4" in out  # the report itself was printed
    assert err.startswith(f"error: cannot write {run / 'accuracy_vs_params.png'}: Read-only file system")
    assert f"make {run} writable" in err and "Traceback" not in err
    assert not (run / "accuracy_vs_params.png").exists()


# ----------------------------------------------------------------------------- 9: CIFAR pickles
def _cifar10(root: Path, payload: object | None = None) -> Path:
    """A CIFAR-10 python folder of 5 + 1 batches (10 images each), the first batch replaced by
    ``payload`` when given."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": name.encode(), b"labels": list(range(10)), b"filenames": [b"x.png"] * 10,
                 b"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8)}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol=2))
    if payload is not None:
        (folder / "data_batch_1").write_bytes(pickle.dumps(payload, protocol=2))
    return folder


class _RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar_batches_are_read_without_running_what_a_pickle_asks_for(tiny_args, workdir, capsys):
    marker = workdir / "pickle-ran"
    data = workdir / "cifar"
    folder = _cifar10(data, payload={b"data": _RunsACommand(marker), b"labels": [0]})
    args = [*tiny_args("data.name=cifar10", f"data.root={data}", "data.options={holdout_fraction: 0.2}"),
            "generalist.epochs=1", "generalist.width=0.125"]
    assert main(["generalist", *args]) == 2
    err = capsys.readouterr().err
    assert f"refused to read {folder / 'data_batch_1'}: it refers to posix.system" in err
    assert "download the data set again" in err and not marker.exists()

    _cifar10(data)  # the real format: numpy arrays, lists, bytes
    assert main(["generalist", *args]) == 0
    assert "data cifar10: 10 classes, 40 train / 10 holdout / 10 test" in capsys.readouterr().out
