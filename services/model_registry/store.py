"""Metadata in SQLite and bytes in a blob store: the model registry's domain logic.

Layout under the registry's root folder and its blob store::

    registry.sqlite3                       model versions, parameter sets, their arrays, tags and holds
    blobs/models/<name>/source-<uuid>.py   source of each model version (key and sha256 in the metadata)
    blobs/models/<name>/<version>.py       source of a version registered before sources had unique keys
    blobs/parameter-sets/<id>/<array>      raw C-order bytes of each array of a parameter set

A parameter set's metadata rows are inserted in one transaction after every one of its blobs has
been committed, so readers see a set whole or not at all. Deleting a model version or a parameter
set removes its rows and records its blob keys as pending deletions in one transaction, then
deletes the blobs; :mod:`lasagne_engine.blobstore.garbage` retries the ones that fail.
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
import weakref
from collections.abc import Callable, Iterable, Iterator

from lasagne_engine.blobstore import RETRYABLE_BLOB_ERRORS, BlobStore, LocalBlobStore
from lasagne_engine.blobstore.garbage import PENDING_DELETIONS_SCHEMA, BlobDeleter, GarbageReport
from lasagne_engine.blobstore.ownership import (
    STORE_INFO_SCHEMA,
    PrefixOwnedElsewhere,
    PrefixOwnership,
    is_owner_marker,
    load_store_id,
)
from lasagne_engine.errors import FailedPrecondition, IntegrityError, InvalidArgument, NotFound
from lasagne_engine.model_registry.records import (
    MODELS_PREFIX,
    PARAMETER_SETS_PREFIX,
    ArrayRecord,
    DeletedModel,
    ModelVersion,
    ParameterSet,
    ParameterSetHold,
    ParameterSetInfo,
    array_key,
    is_model_source_key,
    model_source_key,
    new_model_source_key,
    validate_parameter_set_id,
    validate_session_id,
)
from lasagne_engine.model_registry.uploads import ParameterSetUpload
from lasagne_engine.modeldef import source_sha256
from lasagne_engine.names import parse_ref, validate_name

logger = logging.getLogger(__name__)

DATABASE_NAME = "registry.sqlite3"
# How long a statement waits for another process's write lock before failing.
BUSY_TIMEOUT_MS = 10_000
# Parameter sets per query when reading their arrays, tags and holding sessions; below SQLite's limit on query parameters.
PARAMETER_SET_BATCH = 500

SCHEMA = """
CREATE TABLE IF NOT EXISTS model_versions (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    source_sha256 TEXT NOT NULL,
    description TEXT NOT NULL,
    default_hyperparameters TEXT NOT NULL,
    signature TEXT NOT NULL,
    created_at REAL NOT NULL,
    -- NULL in rows written before sources had unique keys; those use models/<name>/<version>.py.
    source_key TEXT,
    PRIMARY KEY (name, version)
);

CREATE TABLE IF NOT EXISTS parameter_sets (
    sequence INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    model_name TEXT NOT NULL,
    model_version INTEGER NOT NULL,
    session_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    step INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    parent_id TEXT NOT NULL,
    total_bytes INTEGER NOT NULL,
    created_at REAL NOT NULL,
    FOREIGN KEY (model_name, model_version) REFERENCES model_versions (name, version)
);
CREATE INDEX IF NOT EXISTS parameter_sets_by_model ON parameter_sets (model_name, model_version);
CREATE INDEX IF NOT EXISTS parameter_sets_by_session ON parameter_sets (session_id);

CREATE TABLE IF NOT EXISTS parameter_arrays (
    set_id TEXT NOT NULL REFERENCES parameter_sets (id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    name TEXT NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    nbytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    role TEXT NOT NULL,
    PRIMARY KEY (set_id, name)
);

CREATE TABLE IF NOT EXISTS parameter_set_tags (
    set_id TEXT NOT NULL REFERENCES parameter_sets (id) ON DELETE CASCADE,
    tag TEXT NOT NULL,
    PRIMARY KEY (set_id, tag)
);
CREATE INDEX IF NOT EXISTS parameter_set_tags_by_tag ON parameter_set_tags (tag);

-- The last version handed out for each model name, kept after its versions are deleted, so that a
-- version number never names two different sources.
CREATE TABLE IF NOT EXISTS model_version_counters (
    name TEXT PRIMARY KEY,
    last_version INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS parameter_set_holds (
    set_id TEXT NOT NULL REFERENCES parameter_sets (id) ON DELETE CASCADE,
    session_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (set_id, session_id)
);
CREATE INDEX IF NOT EXISTS parameter_set_holds_by_session ON parameter_set_holds (session_id);
""" + PENDING_DELETIONS_SCHEMA + STORE_INFO_SCHEMA

# Called as check(name, source, hyperparameters). It returns the definition's signature or raises
# ModelDefinitionError, as checker.DefinitionChecker does.
DefinitionCheck = Callable[[str, str, dict], dict]


class RegistryStore:
    """Model versions and parameter sets, with metadata in SQLite and bytes in a blob store.

    Every method is safe to call from several threads. One connection serves them all, guarded by
    a lock. Definition checks and blob transfers run outside the lock.

    Parameters
    ----------
    root : pathlib.Path
        Folder of the metadata database ``registry.sqlite3``; created if missing.
    check_definition : callable
        Called as ``check_definition(name, source, hyperparameters)`` before a new model version is
        stored. It returns the definition's signature or raises ``ModelDefinitionError``.
    blob_store : BlobStore, optional
        Where sources and arrays are stored. Default ``LocalBlobStore(root / "blobs")``.

    Notes
    -----
    At startup the store runs :meth:`collect_garbage`: it deletes blobs that no metadata row refers
    to, which a process that stopped mid-upload leaves, and retries failed blob deletions. Two
    processes must therefore never serve one root. A registry whose database does not own the
    ``models/`` and ``parameter-sets/`` prefixes of its blob store, by their owner markers
    (:mod:`lasagne_engine.blobstore.ownership`), serves but never sweeps them.
    """

    def __init__(
        self, root: pathlib.Path, *, check_definition: DefinitionCheck, blob_store: BlobStore | None = None
    ):
        self.root = pathlib.Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.blobs = blob_store if blob_store is not None else LocalBlobStore(self.root / "blobs")
        self._check_definition = check_definition
        self._lock = threading.Lock()
        self._uploading: set[str] = set()
        # Source keys written by registrations whose row is not committed yet, spared by gc.
        self._registering_sources: set[str] = set()

        # isolation_level=None leaves transactions to the explicit BEGIN in _transaction().
        self._connection = sqlite3.connect(
            self.root / DATABASE_NAME, check_same_thread=False, isolation_level=None
        )
        self._connection.row_factory = sqlite3.Row
        self._connection.execute("PRAGMA journal_mode = WAL")
        self._connection.execute("PRAGMA foreign_keys = ON")
        self._connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self._connection.executescript(SCHEMA)
        self._add_source_key_column()
        # Closes the connection when the store is collected, for servers that never call close().
        self._close_connection = weakref.finalize(self, self._connection.close)

        self._deleter = BlobDeleter(self.blobs, self._transaction)
        with self._transaction() as connection:
            self.store_id = load_store_id(connection)
        self._ownership = PrefixOwnership(
            self.blobs,
            self.store_id,
            (MODELS_PREFIX, PARAMETER_SETS_PREFIX),
            service="model registry",
            database=str(self.root / DATABASE_NAME),
        )
        logger.info("Opened the model registry %s at %s with blobs in %r", self.store_id, self.root, self.blobs)
        try:
            self.collect_garbage()
        except PrefixOwnedElsewhere as error:
            # The registry still serves its own models, but it leaves the shared prefixes unswept.
            logger.error("Skipped the startup cleanup of blob store %s: %s", self.blobs.url, error)
        except RETRYABLE_BLOB_ERRORS as error:
            logger.warning("Could not clean up the blob store at startup; 'lasagne-engine gc' does it later: %s", error)

    def _add_source_key_column(self) -> None:
        # Databases created before sources had unique keys lack the column. Their rows keep NULL
        # in it and go on using the key derived from the version number.
        columns = {row["name"] for row in self._connection.execute("PRAGMA table_info(model_versions)")}
        if "source_key" not in columns:
            self._connection.execute("ALTER TABLE model_versions ADD COLUMN source_key TEXT")
            logger.info("Added the column source_key to model_versions in %s", self.root / DATABASE_NAME)

    def close(self) -> None:
        """Close the metadata database. The store must not be used afterwards."""
        with self._lock:
            self._close_connection()
        logger.info("Closed the model registry at %s", self.root)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # BEGIN IMMEDIATE takes SQLite's write lock up front, so reads that decide what to write
        # (the next version number, the tags to move) cannot be overtaken by another writer.
        with self._lock:
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                yield self._connection
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise
            self._connection.execute("COMMIT")

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._connection

    # Models ----------------------------------------------------------------------------------

    def register_model(
        self, name: str, source: str, *, description: str = "", hyperparameters: dict | None = None
    ) -> ModelVersion:
        """Check a model definition and store it as the model's next version.

        Source identical to the latest version's returns that version with ``created=False``,
        without running the check, even if the description or hyperparameters differ.

        Parameters
        ----------
        name : str
            Model name, 1 to 128 characters from ``[A-Za-z0-9._-]``.
        source : str
            Python source defining ``build(hyperparameters)``.
        description : str
            Free text stored with the version. Default empty.
        hyperparameters : dict, optional
            Hyperparameters the definition is checked with and stored as the version's defaults.
            Default empty.

        Returns
        -------
        ModelVersion
            The stored version, without its source.

        Raises
        ------
        InvalidArgument
            If the name is invalid or the source is empty.
        ModelDefinitionError
            If the definition fails to import or build. Nothing is stored then.
        """
        validate_name(name, kind="model")
        if not source.strip():
            raise InvalidArgument(
                f"The source of model {name!r} is empty; send Python source that defines build(hyperparameters)."
            )
        hyperparameters = dict(hyperparameters or {})
        digest = source_sha256(source)

        latest = self._latest_version(name)
        if latest is not None and latest.source_sha256 == digest:
            logger.info("Model %s@%d already has this source; registered nothing", name, latest.version)
            return latest

        signature = self._check_definition(name, source, hyperparameters)

        stored = self._insert_model_version(name, source, digest, description, hyperparameters, signature)
        if stored.created:
            logger.info("Registered model %s@%d (source sha256 %s)", name, stored.version, digest)
        else:
            logger.info("Model %s@%d got this source meanwhile; registered nothing", name, stored.version)
        return stored

    def _insert_model_version(
        self, name: str, source: str, digest: str, description: str, hyperparameters: dict, signature: dict
    ) -> ModelVersion:
        # The source goes to the blob store before the transaction, so that the registry's lock,
        # which readers take too, is never held during a blob transfer. Its key is unique, so a
        # version number that a failed registration hands out again never meets a stale blob.
        source_key = new_model_source_key(name)
        with self._lock:
            self._registering_sources.add(source_key)
        try:
            self.blobs.put_bytes(source_key, source.encode("utf-8"))
            stored = self._insert_model_row(name, source_key, digest, description, hyperparameters, signature)
        except BaseException as error:
            self._delete_unused_source(source_key, reason=f"the registration failed: {error!r}")
            raise
        finally:
            with self._lock:
                self._registering_sources.discard(source_key)

        if not stored.created:
            self._delete_unused_source(source_key, reason=f"version {stored.version} already has this source")
        return stored

    def _insert_model_row(
        self, name: str, source_key: str, digest: str, description: str, hyperparameters: dict, signature: dict
    ) -> ModelVersion:
        with self._transaction() as connection:
            # Another registration of this name may have finished while the check ran.
            row = connection.execute(
                "SELECT * FROM model_versions WHERE name = ? ORDER BY version DESC LIMIT 1", (name,)
            ).fetchone()
            if row is not None and row["source_sha256"] == digest:
                return _model_version(row)

            counter = connection.execute(
                "SELECT last_version FROM model_version_counters WHERE name = ?", (name,)
            ).fetchone()
            version = max(0 if row is None else row["version"], 0 if counter is None else counter[0]) + 1
            connection.execute(
                "INSERT INTO model_version_counters VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET last_version = excluded.last_version",
                (name, version),
            )
            created_at = time.time()
            connection.execute(
                "INSERT INTO model_versions (name, version, source_sha256, description, default_hyperparameters, "
                "signature, created_at, source_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    version,
                    digest,
                    description,
                    json.dumps(hyperparameters),
                    json.dumps(signature),
                    created_at,
                    source_key,
                ),
            )

        return ModelVersion(
            name=name,
            version=version,
            source_sha256=digest,
            description=description,
            default_hyperparameters=hyperparameters,
            signature=signature,
            created_at=created_at,
            created=True,
            source_key=source_key,
        )

    def _delete_unused_source(self, source_key: str, *, reason: str) -> None:
        # A failure here is logged, never raised, so that it cannot hide the registration's own
        # error. The blob is then an orphan, which a later garbage collection deletes.
        try:
            self.blobs.delete(source_key)
        except Exception as error:  # noqa: BLE001 - logged, so that the caller's error stays the one raised
            logger.error("Failed to delete unused model source %s (%s); gc deletes it later: %s", source_key, reason, error)
            return
        logger.info("Deleted unused model source %s because %s", source_key, reason)

    def _latest_version(self, name: str) -> ModelVersion | None:
        with self._reading() as connection:
            row = connection.execute(
                "SELECT * FROM model_versions WHERE name = ? ORDER BY version DESC LIMIT 1", (name,)
            ).fetchone()
        return None if row is None else _model_version(row)

    def list_models(self, name: str = "") -> list[ModelVersion]:
        """List every version of model ``name`` in ascending order, or with ``name`` empty, the latest
        version of every model, sorted by name. Sources are left out.

        Raises
        ------
        InvalidArgument
            If ``name`` is not a valid model name.
        NotFound
            If no model has that name.
        """
        if not name:
            with self._reading() as connection:
                rows = connection.execute(
                    "SELECT m.* FROM model_versions AS m "
                    "JOIN (SELECT name, MAX(version) AS version FROM model_versions GROUP BY name) AS latest "
                    "ON m.name = latest.name AND m.version = latest.version ORDER BY m.name"
                ).fetchall()
            return [_model_version(row) for row in rows]

        validate_name(name, kind="model")
        with self._reading() as connection:
            rows = connection.execute(
                "SELECT * FROM model_versions WHERE name = ? ORDER BY version", (name,)
            ).fetchall()
        if not rows:
            raise self._model_not_found(name)
        return [_model_version(row) for row in rows]

    def get_model(self, ref: str) -> ModelVersion:
        """Return the version that ``ref`` names, with its source.

        Parameters
        ----------
        ref : str
            ``"name"`` for the latest version or ``"name@3"`` for version 3.

        Raises
        ------
        InvalidArgument
            If the reference is malformed.
        NotFound
            If the model or the version does not exist.
        IntegrityError
            If the stored source is missing or its sha256 differs from the recorded one.
        """
        model = self._resolve_model(ref)

        key = model.source_key
        try:
            source_bytes = self.blobs.get_bytes(key)
        except KeyError as error:
            raise IntegrityError(
                f"The source of model {model.name}@{model.version} is missing from the blob store at {key!r}; "
                "restore the blob store from a backup."
            ) from error
        digest = hashlib.sha256(source_bytes).hexdigest()
        if digest != model.source_sha256:
            raise IntegrityError(
                f"The source of model {model.name}@{model.version} at {key!r} has sha256 {digest}, but "
                f"{model.source_sha256} was recorded at registration; restore the blob store from a backup."
            )
        return dataclasses.replace(model, source=source_bytes.decode("utf-8"))

    def _resolve_model(self, ref: str) -> ModelVersion:
        parsed = parse_ref(ref, kind="model")
        with self._reading() as connection:
            if parsed.version is None:
                row = connection.execute(
                    "SELECT * FROM model_versions WHERE name = ? ORDER BY version DESC LIMIT 1", (parsed.name,)
                ).fetchone()
            else:
                row = connection.execute(
                    "SELECT * FROM model_versions WHERE name = ? AND version = ?", (parsed.name, parsed.version)
                ).fetchone()
                latest = connection.execute(
                    "SELECT MAX(version) FROM model_versions WHERE name = ?", (parsed.name,)
                ).fetchone()[0]

        if row is not None:
            return _model_version(row)
        if parsed.version is None or latest is None:
            raise self._model_not_found(parsed.name)
        raise NotFound(
            f"No model version {ref!r}: model {parsed.name!r} has versions 1 to {latest}. "
            "List them with 'lasagne-engine models'."
        )

    def _model_not_found(self, name: str) -> NotFound:
        with self._reading() as connection:
            names = [row[0] for row in connection.execute("SELECT DISTINCT name FROM model_versions")]
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        return NotFound(f"No model {name!r} in the registry{hint} List models with 'lasagne-engine models'.")

    # Parameter sets --------------------------------------------------------------------------

    def start_parameter_set(self, info: ParameterSetInfo) -> ParameterSetUpload:
        """Check a parameter set's metadata and return an upload that receives its arrays.

        Use the upload as a context manager and call :meth:`ParameterSetUpload.commit` inside it.
        Leaving the block without committing deletes every blob the upload wrote.

        Raises
        ------
        InvalidArgument
            If the model reference, a tag or the parent id is malformed, or epoch or step is negative.
        NotFound
            If the model, its version or the parent parameter set does not exist.
        """
        model = self._resolve_model(info.model)
        for tag in info.tags:
            validate_name(tag, kind="tag")
        if info.epoch < 0 or info.step < 0:
            raise InvalidArgument(
                f"Parameter set for model {info.model!r} has epoch {info.epoch} and step {info.step}; "
                "both must be 0 or more."
            )
        if info.parent_id:
            self.get_parameter_set(info.parent_id, kind="parent parameter set")

        # 48 random bits collide rarely, but a collision would overwrite another set's blobs.
        with self._lock:
            connection = self._connection
            while True:
                set_id = "ps-" + uuid.uuid4().hex[:12]
                existing = connection.execute("SELECT 1 FROM parameter_sets WHERE id = ?", (set_id,)).fetchone()
                if existing is None and set_id not in self._uploading:
                    break
            self._uploading.add(set_id)

        logger.info("Receiving parameter set %s for model %s@%d", set_id, model.name, model.version)
        return ParameterSetUpload(self, set_id, info, model.name, model.version)

    def insert_parameter_set(self, parameter_set: ParameterSet) -> None:
        """Insert a parameter set's metadata in one transaction, once the upload has committed every blob.

        Raises
        ------
        NotFound
            If the parent parameter set no longer exists.
        """
        with self._transaction() as connection:
            # The parent may have been deleted while the arrays were arriving.
            if parameter_set.parent_id:
                parent = connection.execute(
                    "SELECT 1 FROM parameter_sets WHERE id = ?", (parameter_set.parent_id,)
                ).fetchone()
                if parent is None:
                    raise NotFound(
                        f"The parent parameter set {parameter_set.parent_id!r} was deleted while "
                        f"{parameter_set.id} was being saved; save again without parent_id or with another parent."
                    )

            connection.execute(
                "INSERT INTO parameter_sets (id, model_name, model_version, session_id, epoch, step, metrics, "
                "parent_id, total_bytes, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    parameter_set.id,
                    parameter_set.model,
                    parameter_set.model_version,
                    parameter_set.session_id,
                    parameter_set.epoch,
                    parameter_set.step,
                    json.dumps(parameter_set.metrics),
                    parameter_set.parent_id,
                    parameter_set.total_bytes,
                    parameter_set.created_at,
                ),
            )
            connection.executemany(
                "INSERT INTO parameter_arrays VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        parameter_set.id,
                        position,
                        array.name,
                        array.dtype,
                        json.dumps(list(array.shape)),
                        array.nbytes,
                        array.sha256,
                        array.role,
                    )
                    for position, array in enumerate(parameter_set.arrays)
                ],
            )
            connection.executemany(
                "INSERT INTO parameter_set_tags VALUES (?, ?)", [(parameter_set.id, tag) for tag in parameter_set.tags]
            )

    def release_upload_id(self, set_id: str) -> None:
        """Forget an id that :meth:`start_parameter_set` reserved, after its upload commits or aborts."""
        with self._lock:
            self._uploading.discard(set_id)

    def list_parameter_sets(self, *, model: str = "", session_id: str = "", tag: str = "") -> list[ParameterSet]:
        """List parameter sets in the order they were saved, keeping those that match every filter given.

        Parameters
        ----------
        model : str
            ``"name"`` keeps the sets of every version of the model, ``"name@3"`` those of version 3.
            Default empty, which keeps every model's sets.
        session_id : str
            Keeps the sets of this training session. Default empty, which keeps every session's sets.
        tag : str
            Keeps the sets carrying this tag. Default empty, which keeps sets with any tags or none.

        Raises
        ------
        InvalidArgument
            If the model reference or the tag is malformed.
        NotFound
            If the model or its version does not exist.
        """
        return self.list_parameter_sets_page(model=model, session_id=session_id, tag=tag)[0]

    def list_parameter_sets_page(
        self, *, model: str = "", session_id: str = "", tag: str = "", after: int = 0, limit: int | None = None
    ) -> tuple[list[ParameterSet], int | None]:
        """List one page of the parameter sets :meth:`list_parameter_sets` lists.

        ``after`` is the position to continue from, 0 for the first page, and ``limit`` the most
        sets to return (None for all). Returns the sets and the position of the next page, or None
        after the last page. A position stays valid while sets are saved and deleted.

        Raises
        ------
        InvalidArgument
            If the model reference or the tag is malformed.
        NotFound
            If the model or its version does not exist.
        """
        conditions = ["sequence > ?"]
        arguments: list = [after]
        if model:
            parsed = parse_ref(model, kind="model")
            resolved = self._resolve_model(model)
            conditions.append("model_name = ?")
            arguments.append(resolved.name)
            if parsed.version is not None:
                conditions.append("model_version = ?")
                arguments.append(resolved.version)
        if session_id:
            conditions.append("session_id = ?")
            arguments.append(session_id)
        if tag:
            validate_name(tag, kind="tag")
            conditions.append("id IN (SELECT set_id FROM parameter_set_tags WHERE tag = ?)")
            arguments.append(tag)
        query = f"SELECT * FROM parameter_sets WHERE {' AND '.join(conditions)} ORDER BY sequence"
        if limit is not None:
            # One row more than the page shows whether another page follows.
            query += " LIMIT ?"
            arguments.append(limit + 1)

        with self._reading() as connection:
            rows = connection.execute(query, arguments).fetchall()
            more = limit is not None and len(rows) > limit
            rows = rows[:limit] if more else rows
            return self._parameter_sets(connection, rows), (rows[-1]["sequence"] if more else None)

    def get_parameter_set(self, set_id: str, *, kind: str = "parameter set") -> ParameterSet:
        """Return the parameter set with id ``set_id``.

        Raises
        ------
        InvalidArgument
            If the id is malformed.
        NotFound
            If no parameter set has that id.
        """
        validate_parameter_set_id(set_id)
        with self._reading() as connection:
            row = connection.execute("SELECT * FROM parameter_sets WHERE id = ?", (set_id,)).fetchone()
            if row is not None:
                return self._parameter_sets(connection, [row])[0]
        raise NotFound(
            f"No {kind} with id {set_id!r}; it was never saved or has been deleted. "
            "List the ids that exist with 'lasagne-engine params'."
        )

    def select_arrays(
        self, set_id: str, names: Iterable[str] = (), *, start_array: str = "", start_offset: int = 0
    ) -> list[ArrayRecord]:
        """Return the arrays of a parameter set named in ``names``, or all of them when it is empty.

        The arrays come in upload order unless ``names`` is given, in which case they come in its order.
        A resumed load passes ``start_array`` and ``start_offset``: the list then starts at that
        array, and the offset is checked against its size.

        Parameters
        ----------
        set_id : str
            Id of the parameter set.
        names : iterable of str
            Arrays to select, in this order. Default: every array, in upload order.
        start_array : str
            Name of the first array to return; empty returns the selection from its first array.
        start_offset : int
            Byte offset within ``start_array`` that the caller reads from. Default 0.

        Raises
        ------
        InvalidArgument
            If the id or ``start_array`` is malformed, ``start_array`` is not among ``names``,
            ``start_offset`` is non-zero without ``start_array``, or it is outside
            ``[0, nbytes]`` of that array.
        NotFound
            If the parameter set does not exist or contains no array of one of the names or of
            ``start_array``.
        """
        parameter_set = self.get_parameter_set(set_id)
        names = list(dict.fromkeys(names))
        by_name = {array.name: array for array in parameter_set.arrays}
        missing = [name for name in names if name not in by_name]
        if missing:
            raise NotFound(
                f"Parameter set {set_id!r} contains no array named {missing[0]!r}; "
                f"its arrays are {sorted(by_name)}."
            )
        selected = [by_name[name] for name in names] if names else list(parameter_set.arrays)
        if not start_array:
            if start_offset != 0:
                raise InvalidArgument(
                    f"start_offset {start_offset} was given without start_array for parameter set {set_id!r}; "
                    "name the array the offset belongs to in start_array, or pass start_offset 0."
                )
            return selected
        return _arrays_from(set_id, selected, by_name, start_array, start_offset)

    def read_array(self, set_id: str, array: ArrayRecord, chunk_bytes: int, *, start_offset: int = 0) -> Iterator[bytes]:
        """Yield an array's bytes from ``start_offset`` in chunks of at most ``chunk_bytes``, verifying its sha256.

        The blob is read sequentially. A resumed read, with ``start_offset`` above 0, first reads and
        hashes the bytes before ``start_offset`` without yielding them, so that the check covers
        the whole blob. The last chunk is held back until the digest of all the bytes has been
        checked, so a reader never receives a whole array that fails the check.

        Raises
        ------
        IntegrityError
            If the blob is missing, or its size or sha256 differs from what was recorded when it was saved.
        NotFound
            If the parameter set was deleted before its blob could be opened.
        """
        key = array_key(set_id, array.name)
        try:
            stream = self.blobs.open(key)
        except KeyError as error:
            raise self._missing_array_blob(set_id, array, key) from error

        def read(size: int = chunk_bytes) -> bytes:
            # An S3 blob deleted after the open raises KeyError at a read, as a missing one does at the open.
            try:
                return stream.read(size)
            except KeyError as error:
                raise self._missing_array_blob(set_id, array, key) from error

        with stream:
            digest = hashlib.sha256()
            size = 0
            while size < start_offset:
                prefix = read(min(chunk_bytes, start_offset - size))
                if not prefix:
                    # The blob is shorter than the offset, which start_offset's check kept within
                    # the recorded size, so this reports the size mismatch.
                    _verify_stored_array(set_id, array, key, size, digest.hexdigest())
                digest.update(prefix)
                size += len(prefix)

            pending = read()
            while True:
                chunk = pending
                pending = read() if chunk else b""
                digest.update(chunk)
                size += len(chunk)
                if not pending:
                    _verify_stored_array(set_id, array, key, size, digest.hexdigest())
                    if chunk:
                        yield chunk
                    return
                yield chunk

    def _missing_array_blob(self, set_id: str, array: ArrayRecord, key: str) -> IntegrityError:
        # Raises NotFound instead when the set was deleted meanwhile, which removes its blobs.
        self.get_parameter_set(set_id)
        return IntegrityError(
            f"Array {array.name!r} of parameter set {set_id!r} is missing from the blob store at {key!r}; "
            f"restore it from a backup or delete the parameter set."
        )

    def delete_parameter_set(self, set_id: str, *, allow_missing: bool = False) -> bool:
        """Delete a parameter set's metadata and then its blobs.

        Sets that name it as their parent keep the id in ``parent_id``. A blob that fails to
        delete stays recorded and is retried at the next start or :meth:`collect_garbage`.

        Parameters
        ----------
        set_id : str
            The parameter set to delete.
        allow_missing : bool
            Return False, instead of raising NotFound, when no set has the id. Default False.

        Returns
        -------
        bool
            True if the set was deleted, False if it did not exist and ``allow_missing`` is set.

        Raises
        ------
        InvalidArgument
            If the id is malformed.
        NotFound
            If no parameter set has that id, unless ``allow_missing`` is set.
        FailedPrecondition
            If a session holds the set; the message names the sessions.
        """
        validate_parameter_set_id(set_id)
        with self._transaction() as connection:
            holders = _holders(connection, [set_id])
            if holders:
                raise _held_error(f"parameter set {set_id}", holders)
            keys = [
                array_key(set_id, name)
                for (name,) in connection.execute("SELECT name FROM parameter_arrays WHERE set_id = ?", (set_id,))
            ]
            deleted = connection.execute("DELETE FROM parameter_sets WHERE id = ?", (set_id,)).rowcount
            BlobDeleter.record(connection, keys, reason=f"deleted parameter set {set_id}")
        if not deleted:
            if allow_missing:
                return False
            raise NotFound(
                f"No parameter set with id {set_id!r}; it was never saved or has been deleted. "
                "List the ids that exist with 'lasagne-engine params'."
            )

        failed = self._deleter.delete(keys)
        logger.info(
            "Deleted parameter set %s and its %d arrays; %d blobs are left for a later retry", set_id, len(keys), failed
        )
        return True

    def delete_model(self, ref: str, *, force: bool = False, allow_missing: bool = False) -> DeletedModel:
        """Delete one model version (``name@3``) or every version (``name``), with its source blob.

        Version numbers are never reused: the next registration of the name gets the number after
        the highest one ever handed out.

        Parameters
        ----------
        ref : str
            ``name@3`` or ``name``.
        force : bool
            Also delete the parameter sets of the deleted versions. Without it, a version that has
            parameter sets is kept. Default False.
        allow_missing : bool
            Return an empty result, instead of raising NotFound, when nothing matches. Default False.

        Returns
        -------
        DeletedModel
            The deleted versions and the ids of the parameter sets deleted with them.

        Raises
        ------
        InvalidArgument
            If the reference is malformed.
        NotFound
            If the model or the version does not exist, unless ``allow_missing`` is set.
        FailedPrecondition
            If a version has parameter sets and ``force`` is not set, or a session holds one of
            them. The message names the sets or the sessions.
        """
        parsed = parse_ref(ref, kind="model")
        with self._transaction() as connection:
            versions = [
                version
                for (version,) in connection.execute(
                    "SELECT version FROM model_versions WHERE name = ? AND (? IS NULL OR version = ?) ORDER BY version",
                    (parsed.name, parsed.version, parsed.version),
                )
            ]
            if not versions:
                set_ids: list[str] = []
                keys: list[str] = []
            else:
                set_ids, keys = self._delete_model_rows(connection, parsed.name, versions, ref=ref, force=force)
        if not versions:
            if allow_missing:
                return DeletedModel(versions=(), parameter_set_ids=())
            raise self._resolve_model_error(ref)

        failed = self._deleter.delete(keys)
        logger.info(
            "Deleted model %s versions %s with %d parameter sets; %d of %d blobs are left for a later retry",
            parsed.name,
            versions,
            len(set_ids),
            failed,
            len(keys),
        )
        return DeletedModel(versions=tuple(versions), parameter_set_ids=tuple(set_ids))

    def _delete_model_rows(
        self, connection: sqlite3.Connection, name: str, versions: list[int], *, ref: str, force: bool
    ) -> tuple[list[str], list[str]]:
        marks = ", ".join("?" * len(versions))
        set_ids = [
            set_id
            for (set_id,) in connection.execute(
                f"SELECT id FROM parameter_sets WHERE model_name = ? AND model_version IN ({marks}) ORDER BY sequence",
                (name, *versions),
            )
        ]
        if set_ids and not force:
            shown = ", ".join(set_ids[:5]) + (f" and {len(set_ids) - 5} more" if len(set_ids) > 5 else "")
            raise FailedPrecondition(
                f"Model {ref!r} still has {len(set_ids)} parameter sets ({shown}); delete them first, or delete "
                "the model with force to delete them too ('lasagne-engine delete-model --force')."
            )
        holders = _holders(connection, set_ids)
        if holders:
            raise _held_error(f"model {ref!r}", holders)

        set_marks = ", ".join("?" * len(set_ids))
        keys = [
            array_key(set_id, array_name)
            for set_id, array_name in connection.execute(
                f"SELECT set_id, name FROM parameter_arrays WHERE set_id IN ({set_marks}) ORDER BY set_id, position",
                set_ids,
            )
        ]
        keys += [
            _source_key(row)
            for row in connection.execute(
                f"SELECT name, version, source_key FROM model_versions WHERE name = ? AND version IN ({marks})",
                (name, *versions),
            )
        ]
        # Keep the highest number ever handed out, so that it is not handed out again.
        connection.execute(
            "INSERT INTO model_version_counters (name, last_version) "
            "SELECT name, MAX(version) FROM model_versions WHERE name = ? GROUP BY name "
            "ON CONFLICT (name) DO UPDATE SET last_version = MAX(last_version, excluded.last_version)",
            (name,),
        )
        connection.execute(f"DELETE FROM parameter_sets WHERE id IN ({set_marks})", set_ids)
        connection.execute(f"DELETE FROM model_versions WHERE name = ? AND version IN ({marks})", (name, *versions))
        BlobDeleter.record(connection, keys, reason=f"deleted model {ref}")
        return set_ids, keys

    def _resolve_model_error(self, ref: str) -> NotFound:
        try:
            self._resolve_model(ref)
        except NotFound as error:
            return error
        return NotFound(f"Model {ref!r} was deleted meanwhile. List models with 'lasagne-engine models'.")

    # Holds -----------------------------------------------------------------------------------

    def hold_parameter_set(self, set_id: str, session_id: str) -> ParameterSetHold:
        """Record that ``session_id`` uses a parameter set, which keeps the set from being deleted.

        Holding a set that the session already holds returns the existing hold.

        Raises
        ------
        InvalidArgument
            If the id or the session id is malformed.
        NotFound
            If no parameter set has that id.
        """
        validate_parameter_set_id(set_id)
        validate_session_id(session_id)
        with self._transaction() as connection:
            if connection.execute("SELECT 1 FROM parameter_sets WHERE id = ?", (set_id,)).fetchone() is None:
                raise NotFound(
                    f"No parameter set with id {set_id!r} to hold for session {session_id!r}; it was never saved "
                    "or has been deleted. List the ids that exist with 'lasagne-engine params'."
                )
            inserted = connection.execute(
                "INSERT OR IGNORE INTO parameter_set_holds VALUES (?, ?, ?)", (set_id, session_id, time.time())
            ).rowcount
            (created_at,) = connection.execute(
                "SELECT created_at FROM parameter_set_holds WHERE set_id = ? AND session_id = ?", (set_id, session_id)
            ).fetchone()
        if inserted:
            logger.info("Session %s holds parameter set %s", session_id, set_id)
        return ParameterSetHold(set_id=set_id, session_id=session_id, created_at=created_at)

    def release_parameter_set(self, set_id: str, session_id: str) -> int:
        """End a session's hold on one parameter set, or with ``set_id`` empty on every set it holds.

        Returns
        -------
        int
            How many holds ended; 0 when the session held nothing that matched.

        Raises
        ------
        InvalidArgument
            If the id or the session id is malformed.
        """
        validate_session_id(session_id)
        if set_id:
            validate_parameter_set_id(set_id)
        with self._transaction() as connection:
            released = connection.execute(
                "DELETE FROM parameter_set_holds WHERE session_id = ? AND (? = '' OR set_id = ?)",
                (session_id, set_id, set_id),
            ).rowcount
        logger.info("Session %s released %d holds on %s", session_id, released, set_id or "its parameter sets")
        return released

    # Garbage ---------------------------------------------------------------------------------

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

        Orphans are parameter set blobs whose set is neither stored nor being uploaded, and model
        sources whose version is not stored.

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
            If the owner marker of ``models/`` or ``parameter-sets/`` names another database's
            store id, as when a second registry shares the blob URL. Nothing is deleted then.
        BlobStoreUnavailable
            If the blob store cannot be listed.
        """
        self._ownership.check(claim=not dry_run)
        report = GarbageReport()
        if not dry_run:
            report.pending_deletions_completed, report.pending_deletions_remaining = self._deleter.retry_pending()

        # List first, then read the uploads in progress, then the metadata: an upload that commits
        # meanwhile has its rows inserted before it leaves the set of uploads.
        set_keys = [
            key for key in self.blobs.list(PARAMETER_SETS_PREFIX) if not is_owner_marker(key, PARAMETER_SETS_PREFIX)
        ]
        source_keys = [key for key in self.blobs.list(MODELS_PREFIX) if not is_owner_marker(key, MODELS_PREFIX)]
        with self._lock:
            referenced_sets = set(self._uploading)
            referenced_sources = set(self._registering_sources)
        with self._reading() as connection:
            referenced_sets |= {set_id for (set_id,) in connection.execute("SELECT id FROM parameter_sets")}
            referenced_sources |= {
                _source_key(row) for row in connection.execute("SELECT name, version, source_key FROM model_versions")
            }
            if dry_run:
                (report.pending_deletions_remaining,) = connection.execute(
                    "SELECT COUNT(*) FROM pending_blob_deletions"
                ).fetchone()

        orphans = [key for key in set_keys if key.split("/")[1] not in referenced_sets]
        for key in source_keys:
            if not is_model_source_key(key):
                logger.warning("Leaving blob %s alone: it is not a model source key of this registry", key)
            elif key not in referenced_sources:
                orphans.append(key)
        report.orphan_blobs = len(orphans)

        if not dry_run:
            self._deleter.delete_orphans(orphans, what="parameter sets and model versions that are not stored")
            report.incomplete_writes = self.blobs.abort_incomplete_writes(
                PARAMETER_SETS_PREFIX, keep=self._is_uploading_key
            )
        logger.info(
            "Garbage collection of the model registry%s: %d orphan blobs, %d incomplete writes, "
            "%d pending deletions completed, %d remaining",
            " (dry run)" if dry_run else "",
            report.orphan_blobs,
            report.incomplete_writes,
            report.pending_deletions_completed,
            report.pending_deletions_remaining,
        )
        return report

    def _is_uploading_key(self, key: str) -> bool:
        parts = key.split("/")
        with self._lock:
            return len(parts) > 1 and parts[1] in self._uploading

    def tag_parameter_set(
        self,
        set_id: str,
        *,
        add_tags: Iterable[str] = (),
        remove_tags: Iterable[str] = (),
        exclusive_in_session: bool = False,
    ) -> ParameterSet:
        """Add and remove tags of a parameter set in one transaction.

        Parameters
        ----------
        set_id : str
            The parameter set to tag.
        add_tags, remove_tags : iterable of str
            Tags to add and to remove. A tag may not appear in both. Defaults empty.
        exclusive_in_session : bool
            Also removes each added tag from the other parameter sets with the same session id, so
            that, for example, only one set of a session carries ``best``. A set with an empty
            session id shares its session with no other set, so nothing else changes. Default False.

        Raises
        ------
        InvalidArgument
            If the id or a tag is malformed, or a tag is both added and removed.
        NotFound
            If no parameter set has that id.
        """
        validate_parameter_set_id(set_id)
        add_tags = list(dict.fromkeys(add_tags))
        remove_tags = list(dict.fromkeys(remove_tags))
        for tag in [*add_tags, *remove_tags]:
            validate_name(tag, kind="tag")
        both = sorted(set(add_tags) & set(remove_tags))
        if both:
            raise InvalidArgument(f"Tag {both[0]!r} is both added to and removed from {set_id!r}; give it in one list.")

        with self._transaction() as connection:
            row = connection.execute("SELECT session_id FROM parameter_sets WHERE id = ?", (set_id,)).fetchone()
            if row is None:
                raise NotFound(
                    f"No parameter set with id {set_id!r}; it was never saved or has been deleted. "
                    "List the ids that exist with 'lasagne-engine params'."
                )
            session_id = row["session_id"]

            moved = 0
            if exclusive_in_session and session_id:
                for tag in add_tags:
                    moved += connection.execute(
                        "DELETE FROM parameter_set_tags WHERE tag = ? AND set_id != ? AND set_id IN "
                        "(SELECT id FROM parameter_sets WHERE session_id = ?)",
                        (tag, set_id, session_id),
                    ).rowcount
            connection.executemany(
                "INSERT OR IGNORE INTO parameter_set_tags VALUES (?, ?)", [(set_id, tag) for tag in add_tags]
            )
            connection.executemany(
                "DELETE FROM parameter_set_tags WHERE set_id = ? AND tag = ?", [(set_id, tag) for tag in remove_tags]
            )

        logger.info(
            "Tagged parameter set %s: added %s, removed %s, moved %d tags away from other sets of session %r",
            set_id,
            add_tags,
            remove_tags,
            moved,
            session_id,
        )
        return self.get_parameter_set(set_id)

    def _parameter_sets(self, connection: sqlite3.Connection, rows: list[sqlite3.Row]) -> list[ParameterSet]:
        """Build the parameter sets of ``rows``, reading their arrays, tags and holding sessions in three queries per batch."""
        arrays: dict[str, list[ArrayRecord]] = {row["id"]: [] for row in rows}
        tags: dict[str, list[str]] = {row["id"]: [] for row in rows}
        holding_sessions: dict[str, list[str]] = {row["id"]: [] for row in rows}
        for batch in _batches(list(arrays), PARAMETER_SET_BATCH):
            marks = ", ".join("?" * len(batch))
            for array in connection.execute(
                f"SELECT * FROM parameter_arrays WHERE set_id IN ({marks}) ORDER BY set_id, position", batch
            ):
                arrays[array["set_id"]].append(ArrayRecord(
                    name=array["name"],
                    dtype=array["dtype"],
                    shape=tuple(json.loads(array["shape"])),
                    nbytes=array["nbytes"],
                    sha256=array["sha256"],
                    role=array["role"],
                ))
            for set_id, tag in connection.execute(
                f"SELECT set_id, tag FROM parameter_set_tags WHERE set_id IN ({marks}) ORDER BY set_id, tag", batch
            ):
                tags[set_id].append(tag)
            for set_id, session in connection.execute(
                f"SELECT set_id, session_id FROM parameter_set_holds WHERE set_id IN ({marks}) ORDER BY set_id, session_id",
                batch,
            ):
                holding_sessions[set_id].append(session)
        return [
            ParameterSet(
                id=row["id"],
                model=row["model_name"],
                model_version=row["model_version"],
                session_id=row["session_id"],
                epoch=row["epoch"],
                step=row["step"],
                metrics=json.loads(row["metrics"]),
                tags=tuple(tags[row["id"]]),
                parent_id=row["parent_id"],
                arrays=tuple(arrays[row["id"]]),
                total_bytes=row["total_bytes"],
                created_at=row["created_at"],
                held_by=tuple(holding_sessions[row["id"]]),
            )
            for row in rows
        ]


def _batches(values: list, size: int) -> Iterator[list]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _arrays_from(
    set_id: str, selected: list[ArrayRecord], by_name: dict[str, ArrayRecord], start_array: str, start_offset: int
) -> list[ArrayRecord]:
    """Return ``selected`` from the array named ``start_array`` on, after checking ``start_offset`` against it."""
    validate_name(start_array, kind="array")
    if start_array not in by_name:
        raise NotFound(
            f"Parameter set {set_id!r} contains no array named {start_array!r} to start from; "
            f"its arrays are {sorted(by_name)}. Pass the name of an array the load already sent."
        )
    position = next((index for index, array in enumerate(selected) if array.name == start_array), None)
    if position is None:
        raise InvalidArgument(
            f"start_array {start_array!r} is not among the requested names {[array.name for array in selected]} "
            f"of parameter set {set_id!r}; pass one of them, or the same names as the load that is resumed."
        )
    first = selected[position]
    if not 0 <= start_offset <= first.nbytes:
        raise InvalidArgument(
            f"Invalid start_offset {start_offset} for array {start_array!r} of parameter set {set_id!r}: "
            f"give an offset from 0 to its size, {first.nbytes} bytes."
        )
    return selected[position:]


def _verify_stored_array(set_id: str, array: ArrayRecord, key: str, size: int, digest: str) -> None:
    if size != array.nbytes:
        raise IntegrityError(
            f"Array {array.name!r} of parameter set {set_id!r} has {size} bytes at {key!r}, but {array.nbytes} "
            "were recorded when it was saved; restore the blob from a backup or delete the parameter set."
        )
    if digest != array.sha256:
        raise IntegrityError(
            f"Array {array.name!r} of parameter set {set_id!r} has sha256 {digest} at {key!r}, but {array.sha256} "
            "was recorded when it was saved; restore the blob from a backup or delete the parameter set."
        )


def _source_key(row: sqlite3.Row) -> str:
    """Return the source key of a model_versions row, derived from its version in rows that have none."""
    return row["source_key"] or model_source_key(row["name"], row["version"])


def _model_version(row: sqlite3.Row) -> ModelVersion:
    return ModelVersion(
        name=row["name"],
        version=row["version"],
        source_sha256=row["source_sha256"],
        description=row["description"],
        default_hyperparameters=json.loads(row["default_hyperparameters"]),
        signature=json.loads(row["signature"]),
        created_at=row["created_at"],
        source_key=_source_key(row),
    )


def _holders(connection: sqlite3.Connection, set_ids: list[str]) -> dict[str, list[str]]:
    """Return the sessions holding each of ``set_ids`` that is held, by set id."""
    holders: dict[str, list[str]] = {}
    for start in range(0, len(set_ids), 500):
        batch = set_ids[start : start + 500]
        rows = connection.execute(
            f"SELECT set_id, session_id FROM parameter_set_holds WHERE set_id IN ({', '.join('?' * len(batch))}) "
            "ORDER BY set_id, session_id",
            batch,
        )
        for set_id, session_id in rows:
            holders.setdefault(set_id, []).append(session_id)
    return holders


def _held_error(what: str, holders: dict[str, list[str]]) -> FailedPrecondition:
    held = "; ".join(f"{set_id} by session {', '.join(map(repr, sessions))}" for set_id, sessions in holders.items())
    return FailedPrecondition(
        f"Cannot delete {what}: parameter sets in use by running sessions ({held}). Stop those sessions, or "
        "release the holds with ReleaseParameterSet (Engine.release_parameter_set), then delete again."
    )
