"""The interface every blob store backend implements."""

import abc
from collections.abc import Iterator
from typing import BinaryIO


class BlobWriter(abc.ABC):
    """An object being written. Nothing is visible under its key until :meth:`commit` returns.

    Use as a context manager: leaving the block without calling :meth:`commit` aborts the write
    and removes whatever was stored so far.
    """

    key: str

    @abc.abstractmethod
    def write(self, data: bytes) -> None:
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
    or object names directly.
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
        """Yield the keys of every committed object under ``prefix``."""

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
