"""Deleting blobs so that none is forgotten, and finding blobs that nothing refers to.

A service deletes an object's metadata and records its blob keys in the table
``pending_blob_deletions`` of the same database, in one transaction. It then deletes the blobs
and removes each key from the table once its blob is gone. A blob that fails to delete, because
the storage is down or the process dies, stays in the table, and the service tries again at its
next start and at each garbage collection.
"""

import contextlib
import dataclasses
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable

from lasagne_engine.blobstore.base import RETRYABLE_BLOB_ERRORS, BlobStore

__all__ = ["PENDING_DELETIONS_SCHEMA", "BlobDeleter", "GarbageReport"]

logger = logging.getLogger(__name__)

PENDING_DELETIONS_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending_blob_deletions (
    key TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    recorded_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT ''
);
"""

# Called with no arguments, returns a context manager that yields a connection inside a write
# transaction and commits when the block ends.
Transaction = Callable[[], contextlib.AbstractContextManager[sqlite3.Connection]]


@dataclasses.dataclass
class GarbageReport:
    """Counts of what one garbage collection found and removed.

    Attributes
    ----------
    orphan_blobs : int
        Blobs that no metadata refers to; removed unless the collection was a dry run.
    incomplete_writes : int
        Writes that never committed, such as multipart uploads of a dead process.
    pending_deletions_completed : int
        Blobs of deleted objects whose deletion had failed before and succeeded now.
    pending_deletions_remaining : int
        Blobs of deleted objects that still failed to delete.
    """

    orphan_blobs: int = 0
    incomplete_writes: int = 0
    pending_deletions_completed: int = 0
    pending_deletions_remaining: int = 0


class BlobDeleter:
    """Deletes blobs through the ``pending_blob_deletions`` table of one database.

    Parameters
    ----------
    blob_store : BlobStore
        Where the blobs are.
    transaction : callable
        Opens a write transaction on the database that contains the table.
    """

    def __init__(self, blob_store: BlobStore, transaction: Transaction):
        self.blob_store = blob_store
        self._transaction = transaction

    @staticmethod
    def record(connection: sqlite3.Connection, keys: Iterable[str], reason: str) -> None:
        """Record ``keys`` for deletion, inside the caller's transaction that deletes their metadata."""
        recorded_at = time.time()
        connection.executemany(
            "INSERT OR IGNORE INTO pending_blob_deletions (key, reason, recorded_at) VALUES (?, ?, ?)",
            [(key, reason, recorded_at) for key in keys],
        )

    def delete(self, keys: Iterable[str]) -> int:
        """Delete the blobs of recorded keys and forget each key whose blob is gone.

        Returns
        -------
        int
            How many blobs failed to delete and stay recorded for a later attempt.
        """
        failed = 0
        for key in keys:
            try:
                self.blob_store.delete(key)
            except RETRYABLE_BLOB_ERRORS as error:
                failed += 1
                logger.warning("Failed to delete blob %s; it stays recorded and is retried later: %s", key, error)
                with self._transaction() as connection:
                    connection.execute(
                        "UPDATE pending_blob_deletions SET attempts = attempts + 1, last_error = ? WHERE key = ?",
                        (str(error), key),
                    )
                continue
            with self._transaction() as connection:
                connection.execute("DELETE FROM pending_blob_deletions WHERE key = ?", (key,))
        return failed

    def retry_pending(self) -> tuple[int, int]:
        """Try again to delete every recorded blob.

        Returns
        -------
        tuple of int
            How many blobs were deleted now, and how many still failed.
        """
        with self._transaction() as connection:
            keys = [key for (key,) in connection.execute("SELECT key FROM pending_blob_deletions ORDER BY key")]
        if not keys:
            return 0, 0
        logger.info("Retrying %d blob deletions that failed earlier", len(keys))
        failed = self.delete(keys)
        return len(keys) - failed, failed

    def delete_orphans(self, keys: list[str], *, what: str) -> None:
        """Delete blobs that no metadata refers to, logging each failure; a later sweep finds them again."""
        for key in keys:
            try:
                self.blob_store.delete(key)
            except RETRYABLE_BLOB_ERRORS as error:
                logger.warning("Failed to delete orphan blob %s of %s: %s", key, what, error)
        if keys:
            logger.warning("Deleted %d orphan blobs of %s that no metadata refers to", len(keys), what)
