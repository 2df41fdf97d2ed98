"""`specdistill data pack`, then a run on the packed data; the packed data's identity."""

import json

import numpy as np
from PIL import Image

from orchestration.cli import main
from orchestration.config import load_config
from orchestration.data_identity import data_fingerprint
from orchestration.pipeline import open_source


def _tree(root, classes=("ant", "bee", "cow"), per_class=14):
    rng = np.random.default_rng(0)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(60 + 70 * k, 20, (10, 10)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_pack_a_folder_tree_then_train_the_generalist_on_it(tiny_args, workdir, capsys):
    _tree(workdir / "photos")
    out = workdir / "packed"
    args = ["data", "pack", str(workdir / "photos"), str(out), "--option", "image_size=8",
            "--option", "channels=1", "--shard-size", "10", "--row-group-size", "4", "--seed", "2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "train shard 1/" in printed and "written" in printed and f"data.root={out}" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == {"src": str(workdir / "photos"), "options": {"image_size": 8, "channels": 1}}
    assert manifest["split"]["seed"] == 2 and manifest["image_shape"] == [1, 8, 8]
    assert sum(sum(manifest["splits"][s]["class_counts"]) for s in manifest["splits"]) == 42
    assert main(args) == 0
    assert "written" not in capsys.readouterr().out          # a re-run keeps every shard

    run = tiny_args("data.name=packed", f"data.root={out}", "data.options={}", "generalist.epochs=1",
                    "generalist.batch_size=8")
    assert main(["run", *run, "--only", "generalist"]) == 0
    assert "generalist test top1" in capsys.readouterr().out
    details = json.loads((workdir / "run" / "generalist" / "manifest.json").read_text())["details"]
    assert details["data"]["num_classes"] == 3


def test_pack_a_built_in_set_and_its_identity(workdir, capsys):
    out = workdir / "h"
    assert main(["data", "pack", "hierarchy", str(out), "--option", "num_superclasses=2",
                 "--option", "classes_per_superclass=2", "--option", "image_size=8",
                 "--option", "train_per_class=5", "--option", "holdout_per_class=2",
                 "--option", "test_per_class=2"]) == 0
    config = load_config(None, ["data.name=packed", f"data.root=file://{out}", "data.options={}"])
    first = data_fingerprint(config)
    assert first == data_fingerprint(config) and len(first) == 64
    assert type(open_source(config, lambda: None)).__name__ == "PackedSource"
    assert main(["data", "pack", "hierarchy", str(out), "--seed", "1", "--option", "num_superclasses=2",
                 "--option", "classes_per_superclass=2", "--option", "image_size=8",
                 "--option", "train_per_class=5", "--option", "holdout_per_class=2",
                 "--option", "test_per_class=2"]) == 0
    assert "other data or options" in capsys.readouterr().out
    assert data_fingerprint(config) != first


def test_bad_input_exits_with_a_message(tiny_args, workdir, capsys):
    assert main(["data", "pack", "hierarchy", str(workdir / "o"), "--option", "nonsense"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main(["data", "pack", str(workdir / "missing-tree"), str(workdir / "o")]) == 2
    assert "unknown data set" in capsys.readouterr().err.lower()
    _tree(workdir / "t" / "train", classes=("a", "b"), per_class=3)
    _tree(workdir / "t" / "test", classes=("a", "b", "z"), per_class=1)
    assert main(["data", "pack", str(workdir / "t"), str(workdir / "o")]) == 2
    assert "['z']" in capsys.readouterr().err
    missing = tiny_args("data.name=packed", f"data.root={workdir / 'nowhere'}", "data.options={}")
    assert main(["run", *missing, "--only", "generalist"]) == 2
    assert "no packed data at" in capsys.readouterr().err and not (workdir / "run").exists()
