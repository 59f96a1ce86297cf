"""Owner markers: which metadata database may sweep a blob prefix.

A service deletes the blobs under its prefixes that its own database does not list, at each start
and at each garbage collection. A second service on the same blob URL, or one started with a fresh
database, would therefore delete every blob the first one stores. To prevent that, each database
carries a store id (a uuid4 hex created with the database), and each swept prefix carries an owner
marker object at ``<prefix>@store-owner`` that names the store id of the database that sweeps it.

A service writes the marker when the prefix has none, and sweeps when the marker names its own
store id. When the marker names another store id, the service deletes nothing. It logs the
conflict at startup and keeps serving, and its garbage collection raises
:class:`PrefixOwnedElsewhere`, which clients receive as FAILED_PRECONDITION.

NOTE: two services that start at the same moment on a prefix without a marker may both write one.
Each rereads the marker after writing it, so the loser of that race reads the other's id, but a
sweep that already started before the reread is not stopped.
"""

import json
import logging
import sqlite3
import time
import uuid

from lasagne_engine.blobstore.base import BlobStore
from lasagne_engine.errors import FailedPrecondition

__all__ = [
    "OWNER_MARKER_NAME",
    "STORE_INFO_SCHEMA",
    "PrefixOwnedElsewhere",
    "PrefixOwnership",
    "is_owner_marker",
    "load_store_id",
    "owner_marker_key",
]

logger = logging.getLogger(__name__)

# "@" never appears in a dataset, model or array name, so no blob key of a service equals a marker.
OWNER_MARKER_NAME = "@store-owner"

STORE_INFO_SCHEMA = """
CREATE TABLE IF NOT EXISTS store_info (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


def owner_marker_key(prefix: str) -> str:
    """Return the key of the owner marker of ``prefix``, which ends in ``/``."""
    return f"{prefix}{OWNER_MARKER_NAME}"


def is_owner_marker(key: str, prefix: str) -> bool:
    return key == owner_marker_key(prefix)


def load_store_id(connection: sqlite3.Connection) -> str:
    """Return the database's store id, creating it in ``store_info`` if the database has none.

    A database created before store ids existed gets one here, on its first start after the upgrade.
    Call it inside a write transaction, so that two processes opening one database agree on the id.
    """
    connection.execute(
        "INSERT OR IGNORE INTO store_info (key, value) VALUES ('store_id', ?)", (uuid.uuid4().hex,)
    )
    (store_id,) = connection.execute("SELECT value FROM store_info WHERE key = 'store_id'").fetchone()
    return store_id


class PrefixOwnedElsewhere(FailedPrecondition):
    """The owner marker of a blob prefix names another store id, so this store must not sweep it.

    Attributes
    ----------
    prefix : str
        The blob prefix, such as ``datasets/``.
    owner_id : str
        The store id in the marker, or the marker's text where it is not a marker of this format.
    store_id : str
        This store's id.
    """

    def __init__(self, message: str, *, prefix: str, owner_id: str, store_id: str):
        super().__init__(message)
        self.prefix = prefix
        self.owner_id = owner_id
        self.store_id = store_id


class PrefixOwnership:
    """Checks, and claims where unclaimed, the owner markers of the prefixes one store sweeps.

    Parameters
    ----------
    blob_store : BlobStore
        Where the prefixes and their markers are.
    store_id : str
        The id of this store's metadata database, from :func:`load_store_id`.
    prefixes : sequence of str
        The prefixes the store sweeps, each ending in ``/``.
    service : str
        What the store serves, such as ``"data service"``, for messages.
    database : str
        Path of the metadata database, written into the marker so that a conflict names it.
    """

    def __init__(self, blob_store: BlobStore, store_id: str, prefixes: tuple[str, ...], *, service: str, database: str):
        self.blob_store = blob_store
        self.store_id = store_id
        self.prefixes = tuple(prefixes)
        self.service = service
        self.database = database

    def check(self, *, claim: bool) -> None:
        """Make sure this store owns every prefix, writing a marker where a prefix has none.

        Parameters
        ----------
        claim : bool
            Write this store's marker on a prefix without one. A dry run passes False, so that it
            changes nothing, and then treats an unmarked prefix as this store's.

        Raises
        ------
        PrefixOwnedElsewhere
            If a prefix's marker names another store id. Nothing has been deleted then.
        BlobStoreUnavailable
            If the blob store cannot be read or written.
        """
        for prefix in self.prefixes:
            key = owner_marker_key(prefix)
            owner = self._read_marker(key)
            if owner is None:
                if not claim:
                    continue
                self._write_marker(key)
                # A service starting at the same moment may have written its marker meanwhile.
                owner = self._read_marker(key)
            owner_id = str(owner.get("store_id", "")) if owner is not None else ""
            if owner_id != self.store_id:
                raise self._conflict(prefix, key, owner or {})

    def _read_marker(self, key: str) -> dict | None:
        try:
            text = self.blob_store.get_bytes(key)
        except KeyError:
            return None
        try:
            marker = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError):
            marker = None
        if not isinstance(marker, dict) or not isinstance(marker.get("store_id"), str):
            # Not a marker this code wrote. Treating it as another owner's marker deletes nothing.
            return {"store_id": f"unreadable marker {text[:100]!r}"}
        return marker

    def _write_marker(self, key: str) -> None:
        marker = {
            "store_id": self.store_id,
            "service": self.service,
            "database": self.database,
            "claimed_at": time.time(),
        }
        self.blob_store.put_bytes(key, json.dumps(marker).encode("utf-8"))
        logger.info(
            "Claimed blob prefix %s of %s for the %s with store id %s", key, self.blob_store.url, self.service, self.store_id
        )

    def _conflict(self, prefix: str, key: str, owner: dict) -> PrefixOwnedElsewhere:
        owner_id = str(owner.get("store_id", ""))
        where = f" ({owner['service']} with database {owner['database']})" if "service" in owner and "database" in owner else ""
        message = (
            f"The blobs under {prefix!r} in {self.blob_store.url} belong to store {owner_id}{where}, not to this "
            f"{self.service}'s store {self.store_id} (database {self.database}), so garbage collection deleted "
            f"nothing. Blobs that this {self.service} stores there may be deleted by the other store's garbage "
            f"collection. Give each {self.service} its own blob URL or prefix in LASAGNE_ENGINE_BLOB_URL. If the other "
            f"store is gone for good and its blobs may be deleted, delete the marker {key!r} and run "
            "'lasagne-engine gc' again."
        )
        return PrefixOwnedElsewhere(message, prefix=prefix, owner_id=owner_id, store_id=self.store_id)
