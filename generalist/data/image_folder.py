"""`image_folder`: any folder-per-class tree of images, loaded into memory.

    root/<class name>/**/<image>               test carved from it (test_fraction)
    root/train/<class name>/**/<image>  and root/test/<class name>/**/<image>

Images are decoded with PIL (:func:`generalist.data.images.decode_image`), converted to L
(channels=1) or RGB (channels=3), resized to image_size x image_size (bilinear, aspect ratio not
kept) and stored as (N, channels, image_size, image_size) uint8. Class ids follow sorted folder
names.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from generalist.data.core import DataBundle, DataError, Split
from generalist.data.external import finish
from generalist.data.images import ImageModeError, decode_image
from generalist.data.registry import (
    check_float,
    check_int,
    check_num_classes,
    register_dataset,
)
from generalist.data.splits import SPLIT_STREAM, carve, derive_seed, shuffled

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def class_images(folder: Path) -> dict[str, list[Path]]:
    """Image files per class sub-folder of `folder` (hidden entries skipped), sorted."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    found = {}
    for directory in classes:
        files = sorted(
            p for p in directory.rglob("*")
            if p.suffix.lower() in EXTENSIONS and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(directory).parts)
        )
        if not files:
            raise DataError(
                f"class folder {directory} holds no images ({', '.join(EXTENSIONS)}); add "
                "images to it or remove the folder."
            )
        found[directory.name] = files
    return found


def tree_files(root: str | None) -> list[Path]:
    """Every image file of the tree at `root` (train/ and test/ included, hidden entries skipped),
    sorted; found without decoding them. DataError when `root` is not a folder."""
    base = _check_root(root)
    return sorted(
        p for p in base.rglob("*")
        if p.suffix.lower() in EXTENSIONS and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(base).parts)
    )


def load_image(path: Path, size: int, channels: int) -> np.ndarray:
    """One image as (channels, size, size) uint8, resized."""
    try:
        return decode_image(path, (channels, size, size), resize=True)
    except (OSError, ImageModeError) as err:  # PIL.UnidentifiedImageError is an OSError too
        raise DataError(f"cannot read image {path} ({err}); fix or delete the file.") from err


def load_split(files: dict[str, list[Path]], class_ids: dict[str, int], size: int,
               channels: int) -> Split:
    """All images of `files` (class -> paths) as a Split, labels from `class_ids`."""
    paths = [(p, class_ids[name]) for name, ps in files.items() for p in ps]
    images = np.zeros((len(paths), channels, size, size), dtype=np.uint8)
    for index, (path, _) in enumerate(paths):
        images[index] = load_image(path, size, channels)
    labels = np.array([label for _, label in paths], dtype=np.int64)
    return Split(torch.from_numpy(images), torch.from_numpy(labels))


def read_tree(root: Path) -> tuple[dict[str, list[Path]], dict[str, list[Path]] | None]:
    """(train files, test files or None when test must be carved) per class."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        train, test = class_images(root / "train"), class_images(root / "test")
        extra = sorted(set(test) - set(train))
        if extra:
            raise DataError(
                f"{root / 'test'} has classes {extra} that {root / 'train'} lacks; every test "
                "class needs training images: add them under train/ or remove them from test/."
            )
        return train, test
    return class_images(root), None


@register_dataset("image_folder")
def build_image_folder(*, root: str | None = None, seed: int = 0, image_size: int = 32,
                       channels: int = 3, holdout_fraction: float = 0.1,
                       test_fraction: float = 0.1, num_classes: int | None = None,
                       source_pattern: str | None = None) -> DataBundle:
    """Images of a folder-per-class tree at `root` (see module doc), splits by seed.

    `source_pattern`: a regular expression whose first group, searched in each training file's
    name, is the image's *source* (its writer, session, product, camera...). The holdout split
    is then a random `holdout_fraction` of the sources with all their images, so the holdout
    shares no source with training, as a test split of new sources does: a holdout that shares
    sources with training overstates gains and biases the choices made on it.
    """
    base, size, train_files, test_files = open_tree(root, image_size, channels, num_classes)
    class_ids = {name: k for k, name in enumerate(train_files)}
    train = load_split(train_files, class_ids, size, channels)
    holdout = None
    if source_pattern is not None:
        train, holdout, held = carve_by_source(train, train_files, source_pattern, holdout_fraction, seed)
    if test_files is None:
        fraction = check_float("test_fraction", test_fraction, minimum=0.0, maximum=1.0,
                               max_inclusive=False)
        train, test = carve(train, fraction, derive_seed(seed, SPLIT_STREAM["test"]))
    else:
        test = load_split(test_files, class_ids, size, channels)
    train = shuffled(train, seed, SPLIT_STREAM["train"], 0)
    info = {"root": str(base), "test_source": "test/" if test_files else "carved",
            "image_size": size, "channels": channels}
    if holdout is not None:
        info.update(source_pattern=source_pattern, holdout_sources=held)
    return finish("image_folder", list(train_files), train, test, seed, holdout_fraction,
                  num_classes, info, holdout=holdout)


def open_tree(root: str | None, image_size: int, channels: int, num_classes: int | None,
              ) -> tuple[Path, int, dict[str, list[Path]], dict[str, list[Path]] | None]:
    """(folder, image size, train files by class, test files by class or None) of the tree at
    ``root``, the options checked: what the data set and the streaming FolderSource both start from."""
    base = _check_root(root)
    size = check_int("image_size", image_size, minimum=4, maximum=1024)
    if channels not in (1, 3) or isinstance(channels, bool):
        raise DataError(f"option channels={channels!r} is invalid; pass channels=1 or 3.")
    train_files, test_files = read_tree(base)
    if len(train_files) < 2:
        raise DataError(
            f"{base} holds {len(train_files)} class folder(s) with images ({list(train_files)}); "
            "a classifier needs at least 2: add one sub-folder of images per class."
        )
    check_num_classes("image_folder", num_classes, len(train_files))
    return base, size, train_files, test_files


def carve_by_source(train: Split, files: dict[str, list[Path]], pattern: str, fraction: float,
                    seed: int) -> tuple[Split, Split, list[str]]:
    """(train, holdout, holdout sources): every image of a random `fraction` of the sources."""
    mask, held = holdout_source_mask(files, pattern, fraction, seed)
    return train.subset(~torch.from_numpy(mask)), train.subset(torch.from_numpy(mask)), held


def holdout_source_mask(files: dict[str, list[Path]], pattern: str, fraction: float,
                        seed: int) -> tuple[np.ndarray, list[str]]:
    """(mask over the files of `files` in load_split's order (N,) bool, the holdout sources)."""
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise DataError(f"source_pattern {pattern!r} is not a regular expression ({err})") from None
    sources = [_source(regex, path) for paths in files.values() for path in paths]  # load_split's order
    names = sorted(set(sources))
    if len(names) < 2:
        raise DataError(f"source_pattern {pattern!r} finds {len(names)} source(s) ({names}); a holdout "
                        "by source needs at least 2: check the pattern against the file names")
    rng = np.random.default_rng(derive_seed(seed, SPLIT_STREAM["holdout"]))
    take = min(len(names) - 1, max(1, round(fraction * len(names))))
    held = sorted(rng.choice(names, size=take, replace=False).tolist())
    return np.array([s in held for s in sources], dtype=bool), held


def _source(regex: re.Pattern, path: Path) -> str:
    match = regex.search(path.name)
    if match is None or not match.groups():
        raise DataError(f"source_pattern {regex.pattern!r} does not match the file name {path.name!r} "
                        "(or has no group); give a pattern whose first group is the source, e.g. "
                        r"'_(\d+)\.png$'")
    return match.group(1)


def _check_root(root: str | None) -> Path:
    if root is None:
        raise DataError(
            "image_folder needs root=<folder> holding one sub-folder of images per class "
            "(or train/ and test/ folders laid out that way). The built-in data sets "
            "'glyphs' and 'hierarchy' need no files."
        )
    base = Path(os.path.expanduser(str(root)))
    if not base.is_dir():
        raise DataError(
            f"image_folder root {str(base)!r} does not exist or is not a folder; pass the "
            "folder holding one sub-folder of images per class."
        )
    return base
