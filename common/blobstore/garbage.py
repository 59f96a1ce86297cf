"""Deleting blobs so that none is forgotten, and finding blobs that nothing refers to.

A service deletes an object's metadata and records its blob keys in the table
``pending_blob_deletions`` of the same database, in one transaction. It then deletes the blobs
and removes each key from the table once its blob is gone. A blob that fails to delete, because
the storage is down or the process dies, stays in the table, and the service tries again at its
next start, at each garbage collection, and every ``LASAGNE_ENGINE_DELETE_RETRY_S`` seconds in a
:class:`PendingDeletionRetrier` thread.
"""

import contextlib
import dataclasses
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from lasagne_engine.blobstore.base import RETRYABLE_BLOB_ERRORS, BlobStore

__all__ = [
    "DEFAULT_DELETE_RETRY_S",
    "DELETE_RETRY_VARIABLE",
    "PENDING_DELETIONS_SCHEMA",
    "BlobDeleter",
    "GarbageReport",
    "PendingDeletionRetrier",
    "add_delete_retries",
    "delete_retry_interval_s",
]

logger = logging.getLogger(__name__)

DELETE_RETRY_VARIABLE = "LASAGNE_ENGINE_DELETE_RETRY_S"
DEFAULT_DELETE_RETRY_S = 300.0
# Keys named in one log line; a longer list is cut off with a count of the rest.
MAX_LOGGED_KEYS = 20

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

    def retry_pending(self, *, stop: threading.Event | None = None) -> tuple[int, int]:
        """Try again to delete every recorded blob, logging the keys.

        Parameters
        ----------
        stop : threading.Event, optional
            Checked before each key; once it is set, the keys not yet tried stay recorded for the
            next attempt. Default: try every key.

        Returns
        -------
        tuple of int
            How many blobs were deleted now, and how many still failed or were not tried.
        """
        with self._transaction() as connection:
            keys = [key for (key,) in connection.execute("SELECT key FROM pending_blob_deletions ORDER BY key")]
        if not keys:
            return 0, 0
        logger.info("Retrying %d blob deletions that failed earlier: %s", len(keys), _key_list(keys))
        deleted: list[str] = []
        for key in keys:
            if stop is not None and stop.is_set():
                break
            if self.delete([key]) == 0:
                deleted.append(key)
        if deleted:
            logger.info("Deleted %d blobs whose deletion had failed earlier: %s", len(deleted), _key_list(deleted))
        return len(deleted), len(keys) - len(deleted)

    def delete_orphans(self, keys: list[str], *, what: str) -> None:
        """Delete blobs that no metadata refers to, logging each failure; a later sweep finds them again."""
        for key in keys:
            try:
                self.blob_store.delete(key)
            except RETRYABLE_BLOB_ERRORS as error:
                logger.warning("Failed to delete orphan blob %s of %s: %s", key, what, error)
        if keys:
            logger.warning("Deleted %d orphan blobs of %s that no metadata refers to", len(keys), what)


class PendingDeletionRetrier:
    """A background thread that retries a store's failed blob deletions every ``interval_s`` seconds.

    It retries only the keys recorded in the store's ``pending_blob_deletions`` table. It never
    lists the blob store or sweeps orphans, so it cannot delete blobs that another service's
    database refers to, even when several services share one blob store.

    Parameters
    ----------
    retry : callable
        Retries the recorded deletions once, as :meth:`BlobDeleter.retry_pending` does, taking
        the ``stop`` event as a keyword.
    interval_s : float
        Seconds between two attempts; the first comes ``interval_s`` after :meth:`start`.
    service : str
        The service, for log lines and the thread's name, for example ``"data service"``.
    """

    def __init__(self, retry: Callable[..., tuple[int, int]], interval_s: float, *, service: str):
        if not 0 < interval_s < math.inf:
            raise ValueError(f"interval_s={interval_s!r} must be a positive, finite number of seconds.")
        self._retry = retry
        self.interval_s = interval_s
        self.service = service
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"delete-retry-{service.replace(' ', '-')}", daemon=True
        )

    def __repr__(self) -> str:
        return f"PendingDeletionRetrier(service={self.service!r}, interval_s={self.interval_s})"

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the thread to stop; a retry in progress ends after the blob it is deleting."""
        self._stop.set()

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait up to ``timeout_s`` seconds for the thread to end; return whether it has ended."""
        if self._thread.ident is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        logger.info(
            "Retrying failed blob deletions of the %s every %g s (%s)", self.service, self.interval_s, DELETE_RETRY_VARIABLE
        )
        while not self._stop.wait(self.interval_s):
            try:
                completed, remaining = self._retry(stop=self._stop)
            # Any error is logged and the next round tries again, because a thread that ended
            # here would leave the deletions unretried until the next start.
            except Exception:  # noqa: BLE001
                logger.exception("The periodic retry of failed blob deletions of the %s failed", self.service)
                continue
            if completed or remaining:
                logger.info(
                    "Periodic retry of failed blob deletions of the %s: %d deleted, %d still pending",
                    self.service,
                    completed,
                    remaining,
                )
        logger.info("Stopped retrying failed blob deletions of the %s", self.service)


def add_delete_retries(
    server: Any, retry: Callable[..., tuple[int, int]], interval_s: float, *, service: str
) -> PendingDeletionRetrier | None:
    """Run a :class:`PendingDeletionRetrier` while ``server`` serves, unless ``interval_s`` is 0.

    Parameters
    ----------
    server : lasagne_engine.rpc.Server
        A server not yet started; it starts the thread and stops it when it stops.
    retry, service
        As for :class:`PendingDeletionRetrier`.
    interval_s : float
        Seconds between retries; 0 turns them off.

    Returns
    -------
    PendingDeletionRetrier or None
        The retrier, or None when the retries are off.

    Raises
    ------
    ValueError
        If ``interval_s`` is negative or not finite.
    """
    if interval_s == 0:
        logger.info("Periodic retries of failed blob deletions of the %s are off (%s=0)", service, DELETE_RETRY_VARIABLE)
        return None
    retrier = PendingDeletionRetrier(retry, interval_s, service=service)
    server.add_background_task(retrier)
    return retrier


def delete_retry_interval_s(interval_s: float | None = None) -> float:
    """Return the seconds between retries of failed blob deletions; 0 turns the retries off.

    Parameters
    ----------
    interval_s : float, optional
        A value to check and return. Default ``$LASAGNE_ENGINE_DELETE_RETRY_S``, else 300.

    Raises
    ------
    ValueError
        If the value is not a finite number of seconds, 0 or more.
    """
    if interval_s is not None:
        if not 0 <= interval_s < math.inf:
            raise ValueError(
                f"delete_retry_s={interval_s!r} is invalid; give the seconds between retries of failed blob "
                "deletions, or 0 to turn them off."
            )
        return float(interval_s)

    text = os.environ.get(DELETE_RETRY_VARIABLE, "")
    if not text:
        return DEFAULT_DELETE_RETRY_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < math.inf:
        raise ValueError(
            f"{DELETE_RETRY_VARIABLE}={text!r} is invalid; give the seconds between retries of failed blob "
            "deletions as a number, or 0 to turn them off."
        )
    return value


def _key_list(keys: list[str]) -> str:
    listed = ", ".join(keys[:MAX_LOGGED_KEYS])
    if len(keys) > MAX_LOGGED_KEYS:
        listed += f" and {len(keys) - MAX_LOGGED_KEYS} more"
    return listed
