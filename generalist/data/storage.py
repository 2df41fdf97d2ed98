"""Files of a packed data set on local disk or in object storage, through ``pyarrow.fs``.

    storage = Storage.open("/data/packed")          # or file:///data/packed, s3://bucket/set, gs://...
    storage.read_bytes("manifest.json")
    storage.write_bytes("train-00000.parquet", data)  # written whole: to NAME.tmp, then moved

A local path may be relative and may start with ``~``; URIs go to
``pyarrow.fs.FileSystem.from_uri`` (credentials from the environment, as pyarrow reads them).
Every failure is a :class:`DataError` naming the path and the fix.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs

from generalist.data.core import DataError

STORAGE_FIX = ("pass a local folder or a URI pyarrow can open (file://, s3://, gs://, hdfs://) and "
               "check that it exists and that its credentials are in the environment")


@dataclass(frozen=True)
class Storage:
    """A folder: a pyarrow file system and the folder's path on it (``root`` as the user gave it)."""

    fs: pafs.FileSystem
    base: str
    root: str

    @classmethod
    def open(cls, root: str) -> Storage:
        text = str(root)
        if "://" not in text:
            return cls(pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(text)), text)
        try:
            fs, base = pafs.FileSystem.from_uri(text)
        except (pa.ArrowException, OSError, ValueError) as err:
            raise DataError(f"cannot open the storage {text!r} ({err}); {STORAGE_FIX}") from None
        return cls(fs, base.rstrip("/"), text)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, name: str) -> str:
        return f"{self.base}/{name}"

    def where(self, name: str) -> str:
        """How messages name file ``name``: the root as given, then the file."""
        return f"{self.root.rstrip('/')}/{name}"

    def exists(self, name: str) -> bool:
        return self._info(name).type == pafs.FileType.File

    def read_bytes(self, name: str) -> bytes:
        try:
            with self.fs.open_input_stream(self.path(name)) as handle:
                return handle.read()
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"cannot read {self.where(name)} ({err}); {STORAGE_FIX}") from None

    def open_input(self, name: str) -> pa.NativeFile:
        """A random-access handle (reads only the byte ranges asked for)."""
        try:
            return self.fs.open_input_file(self.path(name))
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"cannot open {self.where(name)} ({err}); {STORAGE_FIX}") from None

    def write_bytes(self, name: str, data: bytes) -> None:
        """``data`` as file ``name``, complete or not at all (written to NAME.tmp, then moved)."""
        temporary = self.path(name + ".tmp")
        try:
            self.fs.create_dir(self.base, recursive=True)
            with self.fs.open_output_stream(temporary) as handle:
                handle.write(data)
            self.fs.move(temporary, self.path(name))
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"cannot write {self.where(name)} ({err}); {STORAGE_FIX}") from None

    def sha256(self, name: str) -> str | None:
        """sha256 of file ``name``; None when there is no such file."""
        if not self.exists(name):
            return None
        return hashlib.sha256(self.read_bytes(name)).hexdigest()

    def _info(self, name: str) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(self.path(name))
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"cannot reach {self.where(name)} ({err}); {STORAGE_FIX}") from None
