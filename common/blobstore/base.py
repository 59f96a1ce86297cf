"""The interface every blob store backend implements, and the errors backends raise."""

import abc
from collections.abc import Callable, Iterator
from typing import BinaryIO

from lasagne_engine.errors import EngineError, ResourceExhausted, Unavailable


class BlobStoreError(EngineError):
    """Base class of the storage failures a backend reports as domain errors."""


class BlobStoreUnavailable(BlobStoreError, Unavailable):
    """The storage cannot be reached, or failed or timed out through every retry.

    The services return UNAVAILABLE, and the same call succeeds once the storage is back.
    """


class BlobStoreFull(BlobStoreError, ResourceExhausted):
    """The storage has no room left for the object, or the object exceeds its size limit."""


# Exceptions a caller catches when a failed blob operation may be retried later, as for deletions.
RETRYABLE_BLOB_ERRORS = (OSError, BlobStoreError)


class BlobWriter(abc.ABC):
    """An object being written. Nothing is visible under its key until :meth:`commit` returns.

    Use as a context manager: leaving the block without calling :meth:`commit` aborts the write
    and removes whatever was stored so far.
    """

    key: str

    @abc.abstractmethod
    def write(self, data: bytes | memoryview) -> None:
        """Append bytes to the object."""

    @abc.abstractmethod
    def commit(self) -> None:
        """Make the object visible under its key, whole, replacing any object already there."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Discard the bytes written so far. Safe to call more than once and after commit."""

    def __enter__(self) -> "BlobWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.abort()


class BlobStore(abc.ABC):
    """Flat storage of immutable byte objects under ``/``-separated keys.

    Keys are built by the services from validated names only, so a backend may map them to paths
    or object names directly. Backends raise :class:`BlobStoreUnavailable` or
    :class:`BlobStoreFull` when the storage itself fails; the local backend may also raise
    ``OSError``.
    """

    @abc.abstractmethod
    def writer(self, key: str) -> BlobWriter:
        """Start writing the object at ``key``."""

    @abc.abstractmethod
    def open(self, key: str, offset: int = 0) -> BinaryIO:
        """Open the object at ``key`` for sequential reading from ``offset``.

        Raises
        ------
        KeyError
            If no object exists at ``key``.
        """

    @abc.abstractmethod
    def size(self, key: str) -> int:
        """Return the object's size in bytes; raise KeyError if it does not exist."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object at ``key``; removing a missing object is not an error."""

    @abc.abstractmethod
    def list(self, prefix: str) -> Iterator[str]:
        """Yield the keys of every committed object under ``prefix``, in sorted order."""

    @property
    def url(self) -> str:
        """The store's location for messages, such as ``s3://bucket/prefix``; by default its repr."""
        return repr(self)

    def close(self) -> None:
        """Release the store's connections. The default implementation has none to release."""

    def abort_incomplete_writes(self, prefix: str, *, keep: Callable[[str], bool]) -> int:
        """Discard uncommitted writes under ``prefix``, except those whose key ``keep`` accepts.

        Such writes are left by a process that died mid-write. They are never listed, but they may
        still hold storage. ``keep`` accepts the keys of writes still in progress in this process.

        Returns
        -------
        int
            How many writes were discarded. The default implementation has none to discard.
        """
        return 0

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object under ``prefix`` and return how many were removed."""
        removed = 0
        for key in list(self.list(prefix)):
            self.delete(key)
            removed += 1
        return removed

    def put_bytes(self, key: str, data: bytes) -> None:
        """Store a small object in one call."""
        with self.writer(key) as writer:
            writer.write(data)
            writer.commit()

    def get_bytes(self, key: str) -> bytes:
        """Read a small object whole."""
        with self.open(key) as stream:
            return stream.read()
