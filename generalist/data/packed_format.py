"""The packed data format: a folder (local or a URI) of Parquet shards, a manifest and class indexes.

    OUT/manifest.json          format version, name, class names, image shape (C, H, W), encoding,
                               per-split sizes and per-class counts, the split's seed and rule,
                               what was packed, and each split's shards (records, sha256)
    OUT/train-00000.parquet    columns id (int64, stable example id), label (int64) and
    OUT/train-00001.parquet    image (binary, PNG), in row groups of ``row_group_size`` records
    OUT/train-index.npy        int64: offsets (K + 1) | positions sorted by class (N) | labels (N)
    OUT/holdout-..., OUT/test-...

Position p of a split is its p-th record in shard order (shard i holds positions
``sum(records of shards < i)`` onwards). The index answers ``class_counts`` and
``class_positions`` without opening a shard: positions of class k are
``by_class[offsets[k]:offsets[k + 1]]`` (ascending).
"""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from generalist.data.core import SPLIT_NAMES, DataError
from generalist.data.storage import Storage

FORMAT = "specdistill-packed"
VERSION = 1
MANIFEST = "manifest.json"
ENCODING = "png"
COLUMNS = ("id", "label", "image")


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:05d}.parquet"


def index_name(split: str) -> str:
    return f"{split}-index.npy"


def pack_command(manifest: dict, root: str) -> str:
    """The command that (re)writes this packed set, for messages."""
    return f"specdistill data pack {manifest.get('source', {}).get('src', 'SRC')} {root}"


def read_manifest(storage: Storage) -> dict:
    """The manifest of the packed set in ``storage``; DataError when there is none, it is not a
    packed manifest of a version this code reads, or packing did not finish."""
    if not storage.exists(MANIFEST):
        raise DataError(f"no packed data at {storage.root!r} (it has no {MANIFEST}); write it with "
                        f"`specdistill data pack SRC {storage.root}` or point data.root at a packed folder")
    try:
        manifest = json.loads(storage.read_bytes(MANIFEST))
    except ValueError as err:
        raise DataError(f"{storage.where(MANIFEST)} is not valid JSON ({err}); re-run "
                        f"`specdistill data pack SRC {storage.root}` to rewrite it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DataError(f"{storage.where(MANIFEST)} is not a {FORMAT} manifest of version {VERSION}; "
                        f"re-run `specdistill data pack SRC {storage.root}` with this version")
    missing = [s for s in SPLIT_NAMES if s not in manifest.get("splits", {})]
    if missing or not manifest.get("complete"):
        raise DataError(f"packing into {storage.root!r} did not finish; re-run "
                        f"`{pack_command(manifest, storage.root)}` to complete it (finished shards are kept)")
    return manifest


def encode_png(image: np.ndarray) -> bytes:
    """(C, H, W) uint8 with C = 1 or 3 -> PNG bytes (lossless: decodes to the same array)."""
    pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)  # (H, W) or (H, W, 3)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels), mode="L" if image.shape[0] == 1 else "RGB").save(
        buffer, format="PNG")
    return buffer.getvalue()


def encode_index(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """labels (N,) int64 -> int64 (K + 1 + 2N,): offsets | positions sorted by class | labels."""
    counts = np.bincount(labels, minlength=num_classes)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)         # (K + 1,)
    by_class = np.argsort(labels, kind="stable").astype(np.int64)                # (N,)
    return np.concatenate([offsets, by_class, labels.astype(np.int64)])


def index_bytes(labels: np.ndarray, num_classes: int) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, encode_index(labels, num_classes))
    return buffer.getvalue()


class ClassIndex:
    """A split's per-class index (see the module docstring), memory-mapped when local."""

    def __init__(self, array: np.ndarray, num_classes: int) -> None:
        n = (array.shape[0] - num_classes - 1) // 2
        self.offsets = array[:num_classes + 1]                                   # (K + 1,)
        self.by_class = array[num_classes + 1:num_classes + 1 + n]               # (N,)
        self.labels = array[num_classes + 1 + n:]                                # (N,)

    @classmethod
    def load(cls, storage: Storage, split: str, manifest: dict) -> ClassIndex:
        entry = manifest["splits"][split]["index"]
        name = entry["file"]
        if storage.sha256(name) != entry["sha256"]:
            raise DataError(f"the class index {storage.where(name)} is missing or does not match its "
                            f"checksum in the manifest; re-run `{pack_command(manifest, storage.root)}` "
                            "to rewrite it")
        if storage.is_local:
            array = np.load(storage.path(name), mmap_mode="r")
        else:
            array = np.load(io.BytesIO(storage.read_bytes(name)))
        return cls(array, len(manifest["class_names"]))

    def counts(self) -> np.ndarray:
        return np.diff(np.asarray(self.offsets)).astype(np.int64)                # (K,)

    def positions(self, classes: np.ndarray) -> np.ndarray:
        """Sorted positions of every record whose label is in ``classes``."""
        classes = np.unique(np.asarray(classes, dtype=np.int64))
        num_classes = self.offsets.shape[0] - 1
        if classes.size and (classes[0] < 0 or classes[-1] >= num_classes):
            raise DataError(f"class ids {classes.tolist()} are not all in [0, {num_classes}); pass class "
                            "ids of this data set")
        parts = [np.asarray(self.by_class[self.offsets[k]:self.offsets[k + 1]]) for k in classes]
        return np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, np.int64)

