"""Named, versioned, immutable datasets: SQLite metadata plus one blob per array.

Metadata lives in ``root/datasets.sqlite3`` (WAL mode). The bytes of each array are one blob at
``datasets/<name>/<upload-id>/<array-name>``. The upload id is a uuid4 hex chosen when the upload
starts, because the version number is allocated only when the upload commits. A version's rows
are inserted in one transaction after every blob of the upload is committed, so a version is
listed only when it is whole.

Blobs whose upload id is neither in the metadata nor in an upload of this process are orphans,
left by a process that died mid-upload. The store deletes them when it opens and in
:meth:`DatasetStore.collect_garbage`. Deleted versions' blobs go through the table of pending
deletions described in :mod:`lasagne_engine.blobstore.garbage`, so a failed delete is retried.
One database owns the ``datasets/`` prefix of its blob store, and the store sweeps the prefix
only while its owner marker names that database, as :mod:`lasagne_engine.blobstore.ownership`
describes.
"""

import contextlib
import dataclasses
import difflib
import hashlib
import json
import logging
import pathlib
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator

import numpy as np

from lasagne_engine.arrays import ArrayReceiver, validate_header
from lasagne_engine.blobstore import RETRYABLE_BLOB_ERRORS, BlobStore, BlobWriter, LocalBlobStore
from lasagne_engine.blobstore.garbage import PENDING_DELETIONS_SCHEMA, BlobDeleter, GarbageReport
from lasagne_engine.blobstore.ownership import (
    STORE_INFO_SCHEMA,
    PrefixOwnedElsewhere,
    PrefixOwnership,
    is_owner_marker,
    load_store_id,
)
from lasagne_engine.errors import IntegrityError, InvalidArgument, NotFound
from lasagne_engine.names import Ref, parse_ref, validate_name
from lasagne_engine.v1 import arrays_pb2

__all__ = ["ArrayRecord", "DatasetRecord", "DatasetStore", "GarbageReport", "Upload", "blob_key"]

logger = logging.getLogger(__name__)

METADATA_FILENAME = "datasets.sqlite3"
BLOB_PREFIX = "datasets/"
LIST_COMMAND = "lasagne-engine datasets"
DEFAULT_BUSY_TIMEOUT_S = 30.0

# version_counters keeps the last version handed out for each name, even after every version of
# that name is deleted, so a version number is never reused for different data.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS version_counters (
    name TEXT PRIMARY KEY,
    last_version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    upload_id TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS arrays (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    position INTEGER NOT NULL,
    array_name TEXT NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    nbytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY (name, version, array_name),
    FOREIGN KEY (name, version) REFERENCES versions (name, version) ON DELETE CASCADE
);
""" + PENDING_DELETIONS_SCHEMA + STORE_INFO_SCHEMA


def blob_key(dataset_name: str, upload_id: str, array_name: str) -> str:
    """Return the blob store key of one array of one upload."""
    return f"{BLOB_PREFIX}{dataset_name}/{upload_id}/{array_name}"


def _upload_id_of(key: str) -> str:
    # datasets/<name>/<upload-id>/<array-name>; names never contain "/".
    parts = key.split("/")
    return parts[2] if len(parts) == 4 else ""


@dataclasses.dataclass(frozen=True)
class ArrayRecord:
    """One stored array: its dtype in canonical little-endian form, shape, size and hex sha256."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class DatasetRecord:
    """One version of a dataset, with its arrays in upload order.

    ``created_at`` is in seconds since the Unix epoch.
    """

    name: str
    version: int
    upload_id: str
    description: str
    arrays: tuple[ArrayRecord, ...]
    created_at: float

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def total_bytes(self) -> int:
        return sum(array.nbytes for array in self.arrays)

    def array(self, array_name: str) -> ArrayRecord:
        """Return the array called ``array_name``.

        Raises
        ------
        NotFound
            If this version has no such array; the message lists the arrays it has.
        """
        for array in self.arrays:
            if array.name == array_name:
                return array
        existing = ", ".join(repr(array.name) for array in self.arrays)
        raise NotFound(f"Dataset {str(self)!r} has no array {array_name!r}; its arrays are {existing}.")

    def blob_key(self, array_name: str) -> str:
        return blob_key(self.name, self.upload_id, array_name)


class Upload:
    """A dataset version being uploaded, one array at a time.

    Create it with :meth:`DatasetStore.begin_upload` and use it as a context manager. For each
    array, call :meth:`start_array` with its header and then :meth:`write` with its chunks in
    order, then call :meth:`commit` once. Leaving the block without a successful commit deletes
    every blob the upload wrote.

    Attributes
    ----------
    upload_id : str
        The uuid4 hex that names the upload's folder in the blob store.
    """

    def __init__(self, store: "DatasetStore", name: str, description: str):
        self.upload_id = uuid.uuid4().hex
        self.name = name
        self.description = description
        self._store = store
        self._arrays: list[ArrayRecord] = []
        # Every key a writer was opened for, committed or not, so that abort() can remove them all.
        self._keys: list[str] = []
        self._writer: BlobWriter | None = None
        self._receiver: ArrayReceiver | None = None
        self._dtype: np.dtype | None = None
        self._record: DatasetRecord | None = None
        self._aborted = False

    def __enter__(self) -> "Upload":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self._record is None:
            self.abort(reason=exc)

    def start_array(self, header: arrays_pb2.ArrayHeader) -> None:
        """Finish the current array, if any, and start storing the array that ``header`` describes.

        Raises
        ------
        InvalidArgument
            If the header is invalid, names an array already in this upload, has a big-endian
            dtype or sets a role, or if the previous array did not receive exactly its bytes.
        """
        self._check_open()
        self._finish_array()

        dtype = validate_header(header)
        if np.dtype(header.dtype) != dtype:
            raise InvalidArgument(
                f"Array {header.name!r} has the big-endian dtype {header.dtype!r}; "
                f"send its bytes in little-endian order with dtype {dtype.str!r}."
            )
        if header.role:
            raise InvalidArgument(
                f"Array {header.name!r} has role {header.role!r}, but roles apply to parameter sets only; "
                "leave the role empty for dataset arrays."
            )
        if any(array.name == header.name for array in self._arrays):
            raise InvalidArgument(
                f"Dataset {self.name!r} already has an array named {header.name!r} in this upload; "
                "give each array a distinct name."
            )

        key = blob_key(self.name, self.upload_id, header.name)
        self._keys.append(key)
        self._writer = self._store.blob_store.writer(key)
        self._receiver = ArrayReceiver(header, self._writer.write)
        self._dtype = dtype

    def write(self, chunk: bytes) -> None:
        """Append the next chunk of the current array to its blob.

        Raises
        ------
        InvalidArgument
            If no header came before the chunk, or the chunk carries the array past its size.
        """
        self._check_open()
        if self._receiver is None:
            raise InvalidArgument(
                f"Upload of dataset {self.name!r} received a chunk before any array header; "
                "send a header frame before the chunks of each array."
            )
        self._receiver.add(chunk)

    def finish_arrays(self) -> int:
        """Finish the array in progress, if any, and return how many arrays the upload has.

        Raises
        ------
        InvalidArgument
            If the last array did not receive exactly its bytes.
        """
        self._check_open()
        self._finish_array()
        return len(self._arrays)

    def commit(self) -> DatasetRecord:
        """Finish the last array and make the upload visible as the dataset's next version.

        Returns
        -------
        DatasetRecord
            The new version, with the sha256 computed for each array.

        Raises
        ------
        InvalidArgument
            If the upload has no arrays, or its last array did not receive exactly its bytes.
        """
        self._check_open()
        self._finish_array()
        if not self._arrays:
            raise InvalidArgument(
                f"Upload of dataset {self.name!r} has no arrays, and an empty dataset cannot be stored; "
                "send at least one array header and its chunks after the info frame."
            )

        try:
            self._record = self._store._insert_version(self, tuple(self._arrays))
        finally:
            # After the insert, so that a garbage collection never finds these blobs unreferenced.
            if self._record is not None:
                self._store._end_upload(self.upload_id)
        logger.info(
            "Stored dataset %s (upload %s): %d arrays, %d bytes",
            self._record,
            self.upload_id,
            len(self._arrays),
            self._record.total_bytes,
        )
        return self._record

    def abort(self, reason: BaseException | None = None) -> None:
        """Discard the upload and delete every blob it wrote. Does nothing after a commit or abort."""
        if self._record is not None or self._aborted:
            return
        self._aborted = True

        if self._writer is not None:
            try:
                self._writer.abort()
            except RETRYABLE_BLOB_ERRORS:
                logger.exception("Failed to discard blob %s of aborted upload %s", self._writer.key, self.upload_id)
            self._writer = None
        self._receiver = None
        for key in self._keys:
            try:
                self._store.blob_store.delete(key)
            except RETRYABLE_BLOB_ERRORS:
                # The blob is an orphan now, which the next garbage collection deletes.
                logger.exception("Failed to delete blob %s of aborted upload %s", key, self.upload_id)
        self._store._end_upload(self.upload_id)

        logger.warning(
            "Aborted upload %s of dataset %r and deleted its blobs (%d arrays were complete): %s",
            self.upload_id,
            self.name,
            len(self._arrays),
            reason if reason is not None else "closed without a commit",
        )

    def _check_open(self) -> None:
        if self._record is not None or self._aborted:
            state = "committed" if self._record is not None else "aborted"
            raise RuntimeError(f"Upload {self.upload_id} of dataset {self.name!r} is already {state}.")

    def _finish_array(self) -> None:
        if self._receiver is None:
            return
        header = self._receiver.header

        try:
            digest = self._receiver.finish()
        except IntegrityError as error:
            # The client sent bytes that disagree with its own header, so this is a bad request
            # rather than data lost in storage. The message names the array and both digests.
            raise InvalidArgument(f"{error} Resend the array, or correct the sha256 in its header.") from error
        self._writer.commit()

        self._arrays.append(
            ArrayRecord(
                name=header.name,
                dtype=self._dtype.str,
                shape=tuple(header.shape),
                nbytes=header.nbytes,
                sha256=digest,
            )
        )
        self._receiver = None
        self._writer = None
        self._dtype = None


class DatasetStore:
    """Dataset versions stored as SQLite metadata under ``root`` and array bytes in a blob store.

    Every method opens its own SQLite connection, so one store may serve many threads.

    Parameters
    ----------
    root : pathlib.Path
        Folder of the metadata database; created if missing.
    blob_store : BlobStore, optional
        Where array bytes go. Default ``LocalBlobStore(root / "blobs")``.
    busy_timeout_s : float
        How long a write waits for another connection's lock before it fails. Default 30 s.
    """

    def __init__(
        self,
        root: pathlib.Path,
        *,
        blob_store: BlobStore | None = None,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
    ):
        self.root = pathlib.Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.database_path = self.root / METADATA_FILENAME
        self.blob_store = blob_store if blob_store is not None else LocalBlobStore(self.root / "blobs")
        self._busy_timeout_s = busy_timeout_s
        self._deleter = BlobDeleter(self.blob_store, self._transaction)
        self._uploads_lock = threading.Lock()
        self._active_uploads: set[str] = set()

        with self._connect() as connection:
            connection.execute("PRAGMA journal_mode = WAL")
            connection.executescript(_SCHEMA)
        with self._transaction() as connection:
            self.store_id = load_store_id(connection)
        self._ownership = PrefixOwnership(
            self.blob_store, self.store_id, (BLOB_PREFIX,), service="data service", database=str(self.database_path)
        )
        logger.info(
            "Dataset store %s opened: metadata in %s, blobs in %r", self.store_id, self.database_path, self.blob_store
        )
        try:
            self.collect_garbage()
        except PrefixOwnedElsewhere as error:
            # The service still serves its own datasets, but it leaves the shared prefix unswept.
            logger.error("Skipped the startup cleanup of blob store %s: %s", self.blob_store.url, error)
        except RETRYABLE_BLOB_ERRORS as error:
            logger.warning("Could not clean up the blob store at startup; 'lasagne-engine gc' does it later: %s", error)

    def begin_upload(self, name: str, *, description: str = "") -> Upload:
        """Start uploading a new version of dataset ``name``.

        Raises
        ------
        InvalidArgument
            If the name is invalid.
        """
        validate_name(name, kind="dataset")
        upload = Upload(self, name, description)
        with self._uploads_lock:
            self._active_uploads.add(upload.upload_id)
        logger.info("Started upload %s of dataset %r", upload.upload_id, name)
        return upload

    def _end_upload(self, upload_id: str) -> None:
        with self._uploads_lock:
            self._active_uploads.discard(upload_id)

    def _is_uploading(self, upload_id: str) -> bool:
        with self._uploads_lock:
            return upload_id in self._active_uploads

    def retry_pending_deletions(self, *, stop: threading.Event | None = None) -> tuple[int, int]:
        """Retry the blob deletions recorded in this database, without sweeping orphans.

        The periodic retry thread calls it. Only the keys of deleted objects recorded here are
        deleted, so the call cannot remove blobs that another store sharing the blob store refers to.

        Parameters
        ----------
        stop : threading.Event, optional
            Once set, the keys not yet tried stay recorded. Default: try every key.

        Returns
        -------
        tuple of int
            How many blobs were deleted now, and how many stay recorded.
        """
        return self._deleter.retry_pending(stop=stop)

    def collect_garbage(self, *, dry_run: bool = False) -> GarbageReport:
        """Delete orphan blobs and incomplete writes, and retry blob deletions that failed before.

        Orphans are blobs under ``datasets/`` whose upload id is neither a stored version nor an
        upload in progress in this process, which a process that died mid-upload leaves behind.

        Parameters
        ----------
        dry_run : bool
            Count orphans and pending deletions without deleting anything. Default False.

        Returns
        -------
        GarbageReport

        Raises
        ------
        PrefixOwnedElsewhere
            If the owner marker of ``datasets/`` names another database's store id, as when a
            second data service shares the blob URL. Nothing is deleted then.
        BlobStoreUnavailable
            If the blob store cannot be listed.
        """
        self._ownership.check(claim=not dry_run)
        report = GarbageReport()
        if not dry_run:
            report.pending_deletions_completed, report.pending_deletions_remaining = self._deleter.retry_pending()

        # The order matters: list first, then read the uploads in progress, then the metadata.
        # An upload that commits meanwhile is in its version rows before it leaves the set.
        keys = [key for key in self.blob_store.list(BLOB_PREFIX) if not is_owner_marker(key, BLOB_PREFIX)]
        with self._uploads_lock:
            active = set(self._active_uploads)
        with self._transaction(immediate=False) as connection:
            stored = {upload_id for (upload_id,) in connection.execute("SELECT upload_id FROM versions")}
            if dry_run:
                report.pending_deletions_remaining = connection.execute(
                    "SELECT COUNT(*) FROM pending_blob_deletions"
                ).fetchone()[0]
        referenced = stored | active
        orphans = [key for key in keys if _upload_id_of(key) not in referenced]
        report.orphan_blobs = len(orphans)

        if not dry_run:
            self._deleter.delete_orphans(orphans, what="dataset uploads that never committed")
            report.incomplete_writes = self.blob_store.abort_incomplete_writes(
                BLOB_PREFIX, keep=lambda key: self._is_uploading(_upload_id_of(key))
            )
        logger.info(
            "Garbage collection of the dataset store%s: %d orphan blobs, %d incomplete writes, "
            "%d pending deletions completed, %d remaining",
            " (dry run)" if dry_run else "",
            report.orphan_blobs,
            report.incomplete_writes,
            report.pending_deletions_completed,
            report.pending_deletions_remaining,
        )
        return report

    def list_datasets(self, name: str = "") -> list[DatasetRecord]:
        """List every version of dataset ``name`` in ascending order, or with no name the latest
        version of each dataset, sorted by name.

        Raises
        ------
        InvalidArgument
            If the name is invalid.
        NotFound
            If no version of dataset ``name`` exists.
        """
        if name:
            validate_name(name, kind="dataset")

        with self._transaction(immediate=False) as connection:
            if not name:
                rows = connection.execute(
                    "SELECT v.name, v.version, v.upload_id, v.description, v.created_at FROM versions AS v "
                    "JOIN (SELECT name, MAX(version) AS version FROM versions GROUP BY name) USING (name, version) "
                    "ORDER BY v.name"
                ).fetchall()
                return [self._load_version(connection, row) for row in rows]
            return self._all_versions(connection, Ref(name))

    def describe(self, ref: str) -> DatasetRecord:
        """Return the version that ``ref`` names: ``name`` for the latest, ``name@3`` for version 3.

        Raises
        ------
        InvalidArgument
            If the reference is invalid.
        NotFound
            If the dataset or the version does not exist.
        """
        parsed = parse_ref(ref, kind="dataset")
        with self._transaction(immediate=False) as connection:
            return self._find(connection, parsed)

    def read_array(
        self, ref: str, array_name: str, *, start_offset: int = 0, chunk_bytes: int
    ) -> tuple[ArrayRecord, Iterator[bytes]]:
        """Look up one array and return it with an iterator over its bytes from ``start_offset``.

        The iterator reads the blob sequentially in chunks of ``chunk_bytes``, holding one chunk
        at a time. It computes the sha256 of the whole blob and checks it after the last chunk. A
        resumed read, with ``start_offset`` above 0, first reads and hashes the bytes before
        ``start_offset`` without yielding them, so a corrupt blob is reported on every read.

        Raises
        ------
        InvalidArgument
            If the reference or array name is invalid, ``chunk_bytes`` is not positive, or
            ``start_offset`` is outside ``[0, nbytes]``.
        NotFound
            If the dataset, version or array does not exist.
        IntegrityError
            From the iterator, if the blob is missing, has another size or has another sha256
            than recorded.
        """
        parsed = parse_ref(ref, kind="dataset")
        validate_name(array_name, kind="array")
        if chunk_bytes <= 0:
            raise InvalidArgument(f"Invalid chunk_bytes {chunk_bytes!r}: give a positive number of bytes.")

        with self._transaction(immediate=False) as connection:
            record = self._find(connection, parsed)
        array = record.array(array_name)
        if not 0 <= start_offset <= array.nbytes:
            raise InvalidArgument(
                f"Invalid start_offset {start_offset!r} for array {array_name!r} of dataset {str(record)!r}: "
                f"give an offset from 0 to its size, {array.nbytes} bytes."
            )
        return array, self._iter_blob(record, array, start_offset, chunk_bytes)

    def delete(self, ref: str, *, allow_missing: bool = False) -> list[int]:
        """Delete one version (``name@3``) or every version (``name``) of a dataset, with its blobs.

        The metadata goes first, in one transaction that also records the blob keys as pending
        deletions, so no reader sees a version whose blobs are partly gone and no blob is
        forgotten. A blob that fails to delete stays recorded and is retried at the next start or
        :meth:`collect_garbage`. Version numbers are never reused, so a new upload after a delete
        gets the next number.

        Parameters
        ----------
        ref : str
            ``name@3`` or ``name``.
        allow_missing : bool
            Return an empty list, instead of raising NotFound, when nothing matches. Default False.

        Returns
        -------
        list of int
            The deleted versions in ascending order.

        Raises
        ------
        InvalidArgument
            If the reference is invalid.
        NotFound
            If the dataset or the version does not exist, unless ``allow_missing`` is set.
        """
        parsed = parse_ref(ref, kind="dataset")

        with self._transaction() as connection:
            try:
                if parsed.version is None:
                    records = self._all_versions(connection, parsed)
                else:
                    records = [self._find(connection, parsed)]
            except NotFound:
                if allow_missing:
                    return []
                raise
            connection.executemany(
                "DELETE FROM versions WHERE name = ? AND version = ?",
                [(record.name, record.version) for record in records],
            )
            keys = [record.blob_key(array.name) for record in records for array in record.arrays]
            BlobDeleter.record(connection, keys, reason=f"deleted dataset {ref}")

        failed = self._deleter.delete(keys)
        versions = [record.version for record in records]
        logger.info(
            "Deleted dataset %r versions %s; %d of %d blobs are left for a later retry",
            parsed.name,
            versions,
            failed,
            len(keys),
        )
        return versions

    def _all_versions(self, connection: sqlite3.Connection, ref: Ref) -> list[DatasetRecord]:
        rows = connection.execute(
            "SELECT name, version, upload_id, description, created_at FROM versions WHERE name = ? ORDER BY version",
            (ref.name,),
        ).fetchall()
        if not rows:
            raise self._unknown_dataset(connection, ref)
        return [self._load_version(connection, row) for row in rows]

    def _iter_blob(
        self, record: DatasetRecord, array: ArrayRecord, start_offset: int, chunk_bytes: int
    ) -> Iterator[bytes]:
        key = record.blob_key(array.name)
        # The size is checked before any read, so that a blob shorter than recorded is reported as
        # corrupt (DATA_LOSS) whatever the offset, never as a failed read at an offset past its end.
        try:
            size = self.blob_store.size(key)
        except KeyError as error:
            raise self._missing_blob(record, array, key) from error
        if size != array.nbytes:
            raise self._corrupt(record, array, f"its blob {key} has {size} bytes, but {array.nbytes} were recorded")
        try:
            stream = self.blob_store.open(key)
        except KeyError as error:
            raise self._missing_blob(record, array, key) from error

        def read(size: int) -> bytes:
            # An S3 blob deleted after the open raises KeyError at a read, as a missing one does at the open.
            try:
                return stream.read(size)
            except KeyError as error:
                raise self._missing_blob(record, array, key) from error

        digest = hashlib.sha256()
        with stream:
            # A resumed read hashes the bytes before start_offset without sending them, so that the
            # digest check below covers the whole blob.
            skipped = 0
            while skipped < start_offset:
                prefix = read(min(chunk_bytes, start_offset - skipped))
                if not prefix:
                    raise self._corrupt(
                        record, array, f"its blob {key} ended at byte {skipped}, before its recorded size"
                    )
                digest.update(prefix)
                skipped += len(prefix)

            remaining = array.nbytes - start_offset
            while remaining > 0:
                # read() returns bytes, the type a protobuf bytes field takes, so each chunk goes from
                # the file into its message without another copy here.
                chunk = read(min(chunk_bytes, remaining))
                if not chunk:
                    raise self._corrupt(
                        record, array, f"its blob {key} ended {remaining} bytes before its recorded size"
                    )
                digest.update(chunk)
                remaining -= len(chunk)
                yield chunk

        if digest.hexdigest() != array.sha256:
            raise self._corrupt(
                record, array, f"its bytes have sha256 {digest.hexdigest()}, but sha256 {array.sha256} was recorded"
            )

    def _corrupt(self, record: DatasetRecord, array: ArrayRecord, problem: str) -> IntegrityError:
        message = (
            f"Array {array.name!r} of dataset {str(record)!r} is corrupt: {problem}. "
            "Upload the dataset again and delete this version."
        )
        logger.error("%s (upload %s)", message, record.upload_id)
        return IntegrityError(message)

    def _missing_blob(self, record: DatasetRecord, array: ArrayRecord, key: str) -> Exception:
        # A delete between the lookup and the open removes the blob after its metadata.
        with self._transaction(immediate=False) as connection:
            still_listed = connection.execute(
                "SELECT 1 FROM versions WHERE name = ? AND version = ?", (record.name, record.version)
            ).fetchone()
        if still_listed is None:
            return NotFound(
                f"Dataset {str(record)!r} was deleted while array {array.name!r} was being opened; "
                f"list the datasets with {LIST_COMMAND!r}."
            )
        return self._corrupt(record, array, f"its blob {key} is missing")

    def _insert_version(self, upload: Upload, arrays: tuple[ArrayRecord, ...]) -> DatasetRecord:
        created_at = time.time()

        # The version is allocated under the write lock of the same transaction that inserts the
        # rows, so concurrent uploads of one name get distinct, consecutive versions.
        with self._transaction() as connection:
            (version,) = connection.execute(
                "INSERT INTO version_counters (name, last_version) VALUES (?, 1) "
                "ON CONFLICT (name) DO UPDATE SET last_version = last_version + 1 "
                "RETURNING last_version",
                (upload.name,),
            ).fetchone()
            connection.execute(
                "INSERT INTO versions (name, version, upload_id, description, created_at) VALUES (?, ?, ?, ?, ?)",
                (upload.name, version, upload.upload_id, upload.description, created_at),
            )
            connection.executemany(
                "INSERT INTO arrays (name, version, position, array_name, dtype, shape, nbytes, sha256) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (upload.name, version, position, array.name, array.dtype, json.dumps(array.shape), array.nbytes,
                     array.sha256)
                    for position, array in enumerate(arrays)
                ],
            )

        return DatasetRecord(
            name=upload.name,
            version=version,
            upload_id=upload.upload_id,
            description=upload.description,
            arrays=arrays,
            created_at=created_at,
        )

    def _find(self, connection: sqlite3.Connection, ref: Ref) -> DatasetRecord:
        if ref.version is None:
            row = connection.execute(
                "SELECT name, version, upload_id, description, created_at FROM versions "
                "WHERE name = ? ORDER BY version DESC LIMIT 1",
                (ref.name,),
            ).fetchone()
        else:
            row = connection.execute(
                "SELECT name, version, upload_id, description, created_at FROM versions WHERE name = ? AND version = ?",
                (ref.name, ref.version),
            ).fetchone()
        if row is None:
            raise self._unknown_dataset(connection, ref)
        return self._load_version(connection, row)

    def _load_version(self, connection: sqlite3.Connection, row: tuple) -> DatasetRecord:
        name, version, upload_id, description, created_at = row
        array_rows = connection.execute(
            "SELECT array_name, dtype, shape, nbytes, sha256 FROM arrays WHERE name = ? AND version = ? "
            "ORDER BY position",
            (name, version),
        ).fetchall()
        arrays = tuple(
            ArrayRecord(name=array_name, dtype=dtype, shape=tuple(json.loads(shape)), nbytes=nbytes, sha256=sha256)
            for array_name, dtype, shape, nbytes, sha256 in array_rows
        )
        return DatasetRecord(
            name=name,
            version=version,
            upload_id=upload_id,
            description=description,
            arrays=arrays,
            created_at=created_at,
        )

    def _unknown_dataset(self, connection: sqlite3.Connection, ref: Ref) -> NotFound:
        versions = [
            version
            for (version,) in connection.execute(
                "SELECT version FROM versions WHERE name = ? ORDER BY version", (ref.name,)
            )
        ]
        if versions:
            listed = ", ".join(str(version) for version in versions)
            return NotFound(
                f"No dataset version {str(ref)!r}: dataset {ref.name!r} has versions {listed}. "
                f"List the datasets with {LIST_COMMAND!r}."
            )

        names = [name for (name,) in connection.execute("SELECT DISTINCT name FROM versions")]
        close = difflib.get_close_matches(ref.name, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return NotFound(f"No dataset {str(ref)!r} in the data service.{hint} List the datasets with {LIST_COMMAND!r}.")

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # isolation_level=None leaves transactions to the explicit BEGIN in _transaction().
        connection = sqlite3.connect(self.database_path, timeout=self._busy_timeout_s, isolation_level=None)
        try:
            connection.execute("PRAGMA foreign_keys = ON")
            yield connection
        finally:
            connection.close()

    @contextlib.contextmanager
    def _transaction(self, *, immediate: bool = True) -> Iterator[sqlite3.Connection]:
        # BEGIN IMMEDIATE takes the write lock at once, waiting up to the busy timeout, so a
        # transaction that reads and then writes gets no SQLITE_BUSY midway. A deferred BEGIN gives
        # readers one consistent snapshot.
        with self._connect() as connection:
            connection.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")
