"""Writing a packed data set (:mod:`generalist.data.packed_format`) from any ExampleSource.

    manifest = pack_source(FolderSource("photos/"), "s3://bucket/photos-packed",
                           origin={"src": "photos/", "options": {}, "seed": 0, "rule": "..."},
                           shard_size=4096, progress=print)

Shards are written one at a time (``source.take`` of one shard's positions, PNG-encoded, written
whole), so no more than one shard's images are held. After each shard the manifest is rewritten
with ``complete: false`` and the checksum of every shard written so far; a re-run with the same
source and layout keeps each shard whose file still matches its recorded checksum and rewrites
only missing or damaged ones. The class index and the final manifest come last.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from generalist.data.core import SPLIT_NAMES, DataError
from generalist.data.packed_format import (
    ENCODING,
    FORMAT,
    MANIFEST,
    VERSION,
    encode_png,
    index_bytes,
    index_name,
    shard_name,
)
from generalist.data.source import ExampleSource
from generalist.data.storage import Storage

Progress = Callable[[str], None]


def pack_source(source: ExampleSource, root: str, *, origin: dict, shard_size: int = 4096,
                row_group_size: int = 256, name: str | None = None, progress: Progress = print) -> dict:
    """Write ``source``'s train / holdout / test splits as a packed set at ``root``; return its
    manifest. ``origin``: ``src`` and ``options`` (what was packed, for messages and resuming),
    ``seed`` and ``rule`` (how the splits were made); ``name``: the set's name (default
    ``source.name``)."""
    if shard_size < 1 or row_group_size < 1:
        raise DataError(f"shard_size ({shard_size}) and row_group_size ({row_group_size}) must be >= 1")
    check_train_covers(source)
    storage = Storage.open(root)
    manifest = _new_manifest(source, origin, shard_size, row_group_size)
    manifest["name"] = name or source.name
    known = _known_checksums(storage, manifest, progress)
    first_id = 0
    for split in SPLIT_NAMES:
        labels = _pack_split(source, storage, manifest, split, known, first_id, progress)
        entry = manifest["splits"][split]
        entry["class_counts"] = np.bincount(labels, minlength=source.num_classes).astype(int).tolist()
        index = index_bytes(labels, source.num_classes)
        storage.write_bytes(index_name(split), index)
        entry["index"] = {"file": index_name(split), "sha256": hashlib.sha256(index).hexdigest()}
        first_id += entry["size"]
    manifest["complete"] = True
    del manifest["checksums"]
    _write_manifest(storage, manifest)
    progress(f"packed {manifest['name']!r} into {root}: " + ", ".join(
        f"{s} {manifest['splits'][s]['size']:,} records in {len(manifest['splits'][s]['shards'])} shard(s)"
        for s in SPLIT_NAMES))
    return manifest


def check_train_covers(source: ExampleSource) -> None:
    """DataError naming every class with holdout or test images but no training image."""
    train = source.class_counts("train")
    for split in ("holdout", "test"):
        lacking = np.flatnonzero((source.class_counts(split) > 0) & (train == 0))
        if lacking.size:
            names = [source.class_names[k] for k in lacking]
            raise DataError(f"class(es) {names} have images in the {split} split but none in train; a "
                            f"classifier cannot learn them: add training images for them or remove them "
                            f"from {split} (nothing was packed)")


def _new_manifest(source: ExampleSource, origin: dict, shard_size: int, row_group_size: int) -> dict:
    return {
        "format": FORMAT, "version": VERSION, "complete": False,
        "name": source.name, "class_names": list(source.class_names),
        "image_shape": list(source.image_shape), "encoding": ENCODING, "info": source.info,
        "source": {"src": str(origin["src"]), "options": origin.get("options", {})},
        "split": {"seed": origin.get("seed"), "rule": origin.get("rule", "")},
        "shard_size": shard_size, "row_group_size": row_group_size,
        "splits": {s: {"size": source.size(s), "shards": []} for s in SPLIT_NAMES},
        "checksums": {},
    }


def _layout(manifest: dict) -> str:
    """What must match for an earlier run's shards to be kept."""
    keys = ("name", "class_names", "image_shape", "source", "split", "shard_size", "row_group_size")
    sizes = {s: manifest["splits"][s]["size"] for s in SPLIT_NAMES}
    return json.dumps([[manifest.get(k) for k in keys], sizes], sort_keys=True)


def _known_checksums(storage: Storage, manifest: dict, progress: Progress) -> dict[str, str]:
    """file -> sha256 of the shards an earlier run with the same layout recorded; {} otherwise."""
    if not storage.exists(MANIFEST):
        return {}
    try:
        earlier = json.loads(storage.read_bytes(MANIFEST))
        same = _layout(earlier) == _layout(manifest)
    except (ValueError, KeyError, TypeError):
        same = False
    if not same:
        progress(f"{storage.where(MANIFEST)} was written for other data or options: every shard is rewritten")
        return {}
    if "checksums" in earlier:
        return dict(earlier["checksums"])
    return {s["file"]: s["sha256"] for split in SPLIT_NAMES for s in earlier["splits"][split]["shards"]}


def _pack_split(source: ExampleSource, storage: Storage, manifest: dict, split: str,
                known: dict[str, str], first_id: int, progress: Progress) -> np.ndarray:
    """Write (or keep) every shard of ``split``; return its labels in position order, (N,) int64."""
    size, shard_size = manifest["splits"][split]["size"], manifest["shard_size"]
    starts = list(range(0, size, shard_size))
    labels = []
    for number, start in enumerate(starts):
        stop, name = min(start + shard_size, size), shard_name(split, number)
        kept = _kept_labels(storage, name, known.get(name), stop - start)
        if kept is None:
            digest, shard_labels = _write_shard(source, storage, split, name, start, stop, first_id,
                                                manifest["row_group_size"])
        else:
            digest, shard_labels = known[name], kept
        labels.append(shard_labels)
        manifest["splits"][split]["shards"].append({"file": name, "records": stop - start, "sha256": digest})
        known[name] = digest
        manifest["checksums"] = dict(known)
        _write_manifest(storage, manifest)
        progress(f"{split} shard {number + 1}/{len(starts)}: {storage.where(name)} "
                 f"{'kept (checksum matches)' if kept is not None else 'written'}, {stop - start} records")
    return np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)


def _kept_labels(storage: Storage, name: str, digest: str | None, records: int) -> np.ndarray | None:
    """Labels of shard ``name`` when its file matches ``digest`` and holds ``records`` rows, else None."""
    if digest is None or not storage.exists(name):
        return None
    data = storage.read_bytes(name)
    if hashlib.sha256(data).hexdigest() != digest:
        return None
    table = pq.read_table(pa.BufferReader(data), columns=["label"])
    if table.num_rows != records:
        return None
    return table.column("label").to_numpy().astype(np.int64)


def _write_shard(source: ExampleSource, storage: Storage, split: str, name: str, start: int, stop: int,
                 first_id: int, row_group_size: int) -> tuple[str, np.ndarray]:
    """Positions ``start:stop`` of ``split`` as shard ``name``; (its sha256, its labels (n,))."""
    data = source.take(split, np.arange(start, stop))
    images, labels = data.images.numpy(), data.labels.numpy().astype(np.int64)  # (n, C, H, W), (n,)
    table = pa.table({
        "id": pa.array(np.arange(start, stop, dtype=np.int64) + first_id),
        "label": pa.array(labels),
        "image": pa.array([encode_png(image) for image in images], type=pa.binary()),
    })
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=row_group_size)
    blob = sink.getvalue().to_pybytes()
    storage.write_bytes(name, blob)
    return hashlib.sha256(blob).hexdigest(), labels


def _write_manifest(storage: Storage, manifest: dict) -> None:
    storage.write_bytes(MANIFEST, json.dumps(manifest, indent=1).encode())
