"""``specdistill data pack``: write a data set as packed shards (docs/data.md).

    specdistill data pack photos/ s3://bucket/photos-packed --option image_size=64 --shard-size 4096
    specdistill data pack hierarchy out/ --option num_superclasses=100 --seed 0
    specdistill data pack cifar100 out/ --root ~/data          # a torchvision data set on disk

SRC is a folder-per-class tree (read image by image, as the ``image_folder`` data set reads it,
with its options and split rule) or the name of a registered data set (built, in memory, with
``--seed`` and its options). The packed set is then ``data.name=packed data.root=OUT``.
Re-running the same command keeps the shards whose checksums match and rewrites the others.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from generalist.data import create_dataset
from generalist.data.core import DataError
from generalist.data.folder_source import FolderSource
from generalist.data.packed_write import pack_source
from generalist.data.source import ExampleSource, InMemorySource

FOLDER_RULE = ("image_folder: test = test/ when present, else a stratified test_fraction carved by "
               "seed; holdout = a stratified holdout_fraction of train carved by seed (or, with "
               "source_pattern, every image of a holdout_fraction of the sources)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="prepare data for large runs (pack it into streamable shards)")
    actions = data.add_subparsers(dest="data_command", required=True)
    pack = actions.add_parser("pack", help="write a folder tree or a data set as packed Parquet shards")
    pack.add_argument("src", metavar="SRC", help="folder-per-class tree, or a data set name (glyphs, "
                      "hierarchy, cifar100, ...)")
    pack.add_argument("out", metavar="OUT", help="folder or URI (file://, s3://, gs://) to write")
    pack.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                      help="a data-set option (YAML value), e.g. image_size=64; repeatable")
    pack.add_argument("--seed", type=int, default=0, help="seed of the split (and of a built-in set)")
    pack.add_argument("--root", default=None, help="data.root of a named data set on disk (e.g. cifar100)")
    pack.add_argument("--name", default=None, help="the data set's name in the manifest")
    pack.add_argument("--shard-size", type=int, default=4096, help="records per shard (default 4096)")
    pack.add_argument("--row-group-size", type=int, default=256,
                      help="records per Parquet row group, the unit of random reads (default 256)")


def run(ns: argparse.Namespace, console: Console) -> int:
    options = parse_options(ns.option)
    source, rule = open_src(ns.src, options, seed=ns.seed, root=ns.root)
    origin = {"src": ns.src, "options": options, "seed": ns.seed, "rule": rule}

    def progress(line: str) -> None:
        console.print(line, markup=False, highlight=False)

    pack_source(source, ns.out, origin=origin, shard_size=ns.shard_size, row_group_size=ns.row_group_size,
                name=ns.name, progress=progress)
    console.print(f"use it with data.name=packed data.root={ns.out}", markup=False, highlight=False)
    return 0


def parse_options(items: list[str]) -> dict[str, Any]:
    options = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise DataError(f"--option {item!r} is not of the form KEY=VALUE (e.g. --option image_size=64)")
        try:
            options[key.strip()] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as err:
            raise DataError(f"--option {item!r}: the value is not valid YAML ({err}); quote it") from None
    return options


def open_src(src: str, options: dict[str, Any], *, seed: int, root: str | None) -> tuple[ExampleSource, str]:
    """(the source to pack, its split rule): a folder tree read file by file, else a data set by name."""
    if Path(os.path.expanduser(src)).is_dir():
        return FolderSource(src, seed=seed, **options), FOLDER_RULE
    bundle = create_dataset(src, root=root, seed=seed, **options)
    return InMemorySource(bundle), f"{bundle.name}: the data set's own splits for seed {seed}"
