"""Finished results that a config or data change replaces, kept aside instead of destroyed.

Before a finished stage re-runs because its config keys, its data or its upstream results
changed, its whole folder (outputs, manifest, MLflow record) moves to::

    RUN/history/<stage>/<fingerprint>/         fingerprint = the old manifest's digest (16 hex)
    RUN/history/<stage>/<fingerprint>/archived.json   when, why, the changed keys (old -> new),
                                                      the MLflow parent run it belonged to

At most ``run.keep_history`` entries are kept per stage, the oldest dropped; with 0 the old
folder is deleted (the message says so). A stage whose outputs are only damaged is not moved:
it re-runs in place, from its last good checkpoint.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from orchestration.artifacts import ARCHIVED, HISTORY
from orchestration.config import UNHASHED_KEYS, Config
from orchestration.files import read_json, write_json

Change = tuple[str, Any, Any]   # dotted key, old value, new value
UNSET = "(unset)"


def stage_config(config: Config, keys: Sequence[str]) -> dict[str, Any]:
    """The dotted leaf values under ``keys`` (e.g. ``data.options.num_classes``) that a stage's
    fingerprint covers: what its manifest records, to name the keys a later change touches."""
    return {k: v for k, v in config.flat().items()
            if k not in UNHASHED_KEYS and any(k == key or k.startswith(key + ".") for key in keys)}


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any],
                   keys: Iterable[str] | None = None) -> list[Change]:
    """Sorted ``(key, old, new)`` for every dotted key whose value differs (``(unset)`` where a
    side lacks it), restricted to the keys under ``keys`` when given."""
    names = sorted({*old, *new})
    if keys is not None:
        prefixes = tuple(keys)
        names = [k for k in names if any(k == p or k.startswith(p + ".") for p in prefixes)]
    return [(k, old.get(k, UNSET), new.get(k, UNSET)) for k in names
            if old.get(k, UNSET) != new.get(k, UNSET)]


def describe(changes: Sequence[Change]) -> str:
    """``data.options.num_superclasses 3 -> 2, run.seed 0 -> 5``."""
    return ", ".join(f"{key} {_show(old)} -> {_show(new)}" for key, old, new in changes)


def _show(value: Any) -> str:
    return value if value == UNSET else repr(value) if isinstance(value, str) else str(value)


def archive_stage(run: Path, stage: str, digest: str, keep: int, record: Mapping[str, Any]) -> Path | None:
    """Move ``RUN/<stage>/`` to ``RUN/history/<stage>/<digest[:16]>/`` with ``archived.json``
    (``record`` plus the time) and drop the oldest entries beyond ``keep``; returns the new
    folder, or None when ``keep`` is 0 and the folder was deleted."""
    source = run / stage
    if keep == 0:
        shutil.rmtree(source)
        return None
    target = run / HISTORY / stage / digest[:16]
    if target.exists():             # the same result was set aside before: keep the newer copy
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(source, target)      # one rename: the stage folder is either here or there
    write_json(target / ARCHIVED, {**record, "archived": time.time()})
    _prune(target.parent, keep)
    return target


def _prune(folder: Path, keep: int) -> None:
    """Delete all but the ``keep`` most recently archived entries of ``folder``."""
    entries = sorted((p for p in folder.iterdir() if p.is_dir()), key=_archived_at, reverse=True)
    for old in entries[keep:]:
        shutil.rmtree(old)


def _archived_at(entry: Path) -> float:
    try:
        return float(read_json(entry / ARCHIVED)["archived"])
    except (OSError, ValueError, KeyError, TypeError):
        return entry.stat().st_mtime
