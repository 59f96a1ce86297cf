"""Blob store backend on a local folder, the embedded default."""

import contextlib
import errno
import fcntl
import logging
import os
import pathlib
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

from lasagne_engine.blobstore.base import BlobStore, BlobStoreFull, BlobWriter
from lasagne_engine.durability import fsync_folder

logger = logging.getLogger(__name__)

# Partial writes live here, outside the key space, so listing never shows them.
_INCOMING = ".incoming"
# errno values that mean the folder has no room left, which callers see as RESOURCE_EXHAUSTED.
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


@contextlib.contextmanager
def _full_storage_errors(root: pathlib.Path, key: str) -> Iterator[None]:
    try:
        yield
    except OSError as error:
        if error.errno in _FULL_ERRNOS:
            raise BlobStoreFull(
                f"The blob store folder {str(root)!r} has no room for blob {key!r} ({error.strerror}); "
                "free disk space or move LASAGNE_ENGINE_BLOB_URL to a larger volume."
            ) from error
        raise


class LocalBlobWriter(BlobWriter):
    def __init__(self, root: pathlib.Path, key: str):
        self.key = key
        self._root = root
        self._final_path = root / key
        incoming = root / _INCOMING
        incoming.mkdir(parents=True, exist_ok=True)
        descriptor, temporary_name = tempfile.mkstemp(dir=incoming, prefix="blob-")
        # The lock tells a process that starts on the same folder that this write is alive, so
        # its sweep of partial files leaves this one alone. The kernel drops it if we die.
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        self._temporary_path = pathlib.Path(temporary_name)
        self._file = os.fdopen(descriptor, "wb")
        self._done = False

    def write(self, data: bytes | memoryview) -> None:
        with _full_storage_errors(self._root, self.key):
            self._file.write(data)

    def commit(self) -> None:
        # fsync before the rename, so that after a crash the key holds either nothing or every byte.
        with _full_storage_errors(self._root, self.key):
            self._file.flush()
            os.fsync(self._file.fileno())
        self._file.close()
        folder = self._final_path.parent
        created = []
        ancestor = folder
        while ancestor != self._root and not ancestor.exists():
            created.append(ancestor)
            ancestor = ancestor.parent
        folder.mkdir(parents=True, exist_ok=True)
        os.replace(self._temporary_path, self._final_path)
        # The rename, and each folder created for it, is durable only once the folder that
        # contains the new entry is synced. Without that, metadata committed after this call could
        # list a blob that a power cut took away.
        fsync_folder(folder)
        for new_folder in created:
            fsync_folder(new_folder.parent)
        self._done = True

    def abort(self) -> None:
        if self._done:
            return
        with contextlib.suppress(OSError):
            self._file.close()
        self._temporary_path.unlink(missing_ok=True)
        self._done = True


class LocalBlobStore(BlobStore):
    """Stores each object as a file at ``root/key``; writes go through a temporary file and a rename."""

    def __init__(self, root: str | os.PathLike):
        self.root = pathlib.Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_abandoned_partial_files()

    def __repr__(self) -> str:
        return f"LocalBlobStore({str(self.root)!r})"

    @property
    def url(self) -> str:
        return self.root.as_uri()

    def _remove_abandoned_partial_files(self) -> None:
        # Leftovers of writes cut short by a crash. A file still locked belongs to a live write of
        # another process on the same folder.
        for leftover in (self.root / _INCOMING).glob("blob-*"):
            try:
                descriptor = os.open(leftover, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            finally:
                os.close(descriptor)
            logger.info("Removing partial blob %s left by an earlier process", leftover)
            leftover.unlink(missing_ok=True)

    def _path(self, key: str) -> pathlib.Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents or key.startswith(_INCOMING):
            raise ValueError(f"Blob key {key!r} leaves the store's folder.")
        return path

    def writer(self, key: str) -> BlobWriter:
        self._path(key)
        with _full_storage_errors(self.root, key):
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
        # Walk only the folder that contains every key under the prefix.
        folder = (self.root / prefix.rpartition("/")[0]).resolve()
        if folder != self.root and self.root not in folder.parents:
            raise ValueError(f"Blob key prefix {prefix!r} leaves the store's folder.")
        if not folder.is_dir():
            return
        for path in sorted(folder.rglob("*")):
            if not path.is_file():
                continue
            key = path.relative_to(self.root).as_posix()
            if key.startswith(_INCOMING) or not key.startswith(prefix):
                continue
            yield key
