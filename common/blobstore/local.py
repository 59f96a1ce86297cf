"""Blob store backend on a local folder, the embedded default."""

import logging
import os
import pathlib
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

from lasagne_engine.blobstore.base import BlobStore, BlobWriter

logger = logging.getLogger(__name__)

# Partial writes live here, outside the key space, so listing never shows them.
_INCOMING = ".incoming"


class LocalBlobWriter(BlobWriter):
    def __init__(self, root: pathlib.Path, key: str):
        self.key = key
        self._final_path = root / key
        incoming = root / _INCOMING
        incoming.mkdir(parents=True, exist_ok=True)
        descriptor, temporary_name = tempfile.mkstemp(dir=incoming, prefix="blob-")
        self._temporary_path = pathlib.Path(temporary_name)
        self._file = os.fdopen(descriptor, "wb")
        self._done = False

    def write(self, data: bytes) -> None:
        self._file.write(data)

    def commit(self) -> None:
        # fsync before the rename, so that after a crash the key holds either nothing or every byte.
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._final_path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._temporary_path, self._final_path)
        self._done = True

    def abort(self) -> None:
        if self._done:
            return
        self._file.close()
        self._temporary_path.unlink(missing_ok=True)
        self._done = True


class LocalBlobStore(BlobStore):
    """Stores each object as a file at ``root/key``; writes go through a temporary file and a rename."""

    def __init__(self, root: str | os.PathLike):
        self.root = pathlib.Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        # Leftovers of writes cut short by a crash.
        for leftover in (self.root / _INCOMING).glob("blob-*"):
            logger.info("Removing partial blob %s left by an earlier process", leftover)
            leftover.unlink(missing_ok=True)

    def __repr__(self) -> str:
        return f"LocalBlobStore({str(self.root)!r})"

    def _path(self, key: str) -> pathlib.Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents or key.startswith(_INCOMING):
            raise ValueError(f"Blob key {key!r} leaves the store's folder.")
        return path

    def writer(self, key: str) -> BlobWriter:
        self._path(key)
        return LocalBlobWriter(self.root, key)

    def open(self, key: str, offset: int = 0) -> BinaryIO:
        try:
            stream = open(self._path(key), "rb")
        except FileNotFoundError as error:
            raise KeyError(key) from error
        if offset:
            stream.seek(offset)
        return stream

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError as error:
            raise KeyError(key) from error

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # Prune folders left empty, up to the root, so deleted versions leave no trace.
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def list(self, prefix: str) -> Iterator[str]:
        for path in sorted(self.root.rglob("*")):
            if not path.is_file():
                continue
            key = path.relative_to(self.root).as_posix()
            if key.startswith(_INCOMING) or not key.startswith(prefix):
                continue
            yield key
