"""Files in a run directory: atomic writes, JSON, checksums.

Readers see either the old file or the whole new one; a full or read-only disk is reported as
:class:`RunDirError` naming the path and the fix, with nothing half-written.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


class RunDirError(RuntimeError):
    """The run directory cannot be used (not writable, disk full, ...)."""


_FULL_OR_READ_ONLY = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


RUN_DIR_FIX = ("Free disk space or point run.dir at another disk, then re-run the same command "
               "to resume")


def atomic_write_bytes(path: Path, data: bytes, *, fix: str = RUN_DIR_FIX) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one; a full or
    read-only disk (also when the folder or the temporary file cannot be made) is a RunDirError
    ending with ``fix``."""
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in _FULL_OR_READ_ONLY:
            raise RunDirError(
                f"cannot write {path}: {exc.strerror or exc}; nothing was half-written (the previous "
                f"version, if any, is intact). {fix}"
            ) from None
        raise


def atomic_write_text(path: Path, text: str, *, fix: str = RUN_DIR_FIX) -> None:
    atomic_write_bytes(path, text.encode(), fix=fix)


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
