"""Receiving a parameter set's arrays straight into blobs, all or nothing."""

import logging
import time
from typing import TYPE_CHECKING

from lasagne_engine.arrays import ArrayReceiver, validate_header
from lasagne_engine.blobstore import RETRYABLE_BLOB_ERRORS, BlobWriter
from lasagne_engine.errors import IntegrityError, InvalidArgument
from lasagne_engine.model_registry.records import (
    ARRAY_ROLES,
    ArrayRecord,
    ParameterSet,
    ParameterSetInfo,
    array_key,
)
from lasagne_engine.v1 import arrays_pb2

if TYPE_CHECKING:
    from lasagne_engine.model_registry.store import RegistryStore

logger = logging.getLogger(__name__)


class ParameterSetUpload:
    """A parameter set being received: one array at a time, each written straight into a blob.

    Call :meth:`begin_array` with each array's header, then :meth:`write` with its chunks in
    order, and finally :meth:`commit`. Use it as a context manager. Leaving the block without a
    commit, or a commit that fails, deletes every blob written so far.
    """

    def __init__(self, store: "RegistryStore", set_id: str, info: ParameterSetInfo, model: str, model_version: int):
        self.id = set_id
        self._store = store
        self._info = info
        self._model = model
        self._model_version = model_version
        self._arrays: list[ArrayRecord] = []
        self._committed_keys: list[str] = []
        self._writer: BlobWriter | None = None
        self._receiver: ArrayReceiver | None = None
        self._done = False

    def __enter__(self) -> "ParameterSetUpload":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if not self._done:
            self.abort(reason=exc if exc is not None else "the upload ended without a commit")

    def begin_array(self, header: arrays_pb2.ArrayHeader) -> None:
        """Finish the array in progress, if any, and start receiving the array ``header`` describes.

        Raises
        ------
        InvalidArgument
            If the header is invalid, repeats an array name or has an unknown role, or if the
            previous array is incomplete or its bytes do not match its header's sha256.
        """
        self._finish_array()

        validate_header(header)
        if any(array.name == header.name for array in self._arrays):
            raise InvalidArgument(
                f"Parameter set {self.id} received array {header.name!r} twice; give each array its own name."
            )
        if header.role not in ARRAY_ROLES:
            raise InvalidArgument(
                f"Array {header.name!r} has role {header.role!r}; use 'trainable', 'state', 'optimizer' or leave it empty."
            )

        self._writer = self._store.blobs.writer(array_key(self.id, header.name))
        self._receiver = ArrayReceiver(header, self._writer.write)

    def write(self, chunk: bytes) -> None:
        """Append a chunk to the array in progress.

        Raises
        ------
        InvalidArgument
            If no header came before the chunk, or the chunk goes past the array's declared size.
        """
        if self._receiver is None:
            raise InvalidArgument(
                f"Parameter set {self.id} received a chunk before any array header; "
                "send an ArrayHeader before the chunks of each array."
            )
        self._receiver.add(chunk)

    def finish_arrays(self) -> int:
        """Finish the array in progress, if any, and return how many arrays the set has.

        Raises
        ------
        InvalidArgument
            If the last array is incomplete or fails its sha256 check.
        """
        self._finish_array()
        return len(self._arrays)

    def commit(self) -> ParameterSet:
        """Finish the last array and make the parameter set visible, whole.

        Raises
        ------
        InvalidArgument
            If the last array is incomplete or fails its sha256 check, or no array was sent.
        NotFound
            If the parent parameter set was deleted during the upload.
        """
        self._finish_array()
        if not self._arrays:
            raise InvalidArgument(
                f"Parameter set {self.id} for model {self._info.model!r} has no arrays; "
                "send a header and the chunks of each array after the info frame."
            )

        parameter_set = ParameterSet(
            id=self.id,
            model=self._model,
            model_version=self._model_version,
            session_id=self._info.session_id,
            epoch=self._info.epoch,
            step=self._info.step,
            metrics=dict(self._info.metrics),
            tags=tuple(sorted(set(self._info.tags))),
            parent_id=self._info.parent_id,
            arrays=tuple(self._arrays),
            total_bytes=sum(array.nbytes for array in self._arrays),
            created_at=time.time(),
        )
        self._store.insert_parameter_set(parameter_set)
        self._done = True
        self._store.release_upload_id(self.id)

        logger.info(
            "Saved parameter set %s for model %s@%d: %d arrays, %d bytes",
            self.id,
            self._model,
            self._model_version,
            len(self._arrays),
            parameter_set.total_bytes,
        )
        return parameter_set

    def abort(self, *, reason: object = "aborted by the caller") -> None:
        """Delete every blob this upload wrote. Does nothing after a successful commit."""
        if self._done:
            return
        self._done = True

        try:
            if self._writer is not None:
                self._writer.abort()
            for key in self._committed_keys:
                self._store.blobs.delete(key)
        except RETRYABLE_BLOB_ERRORS:
            # The blobs left are orphans now, which the next garbage collection deletes.
            logger.exception("Failed to delete the stored arrays of discarded parameter set %s", self.id)
        finally:
            self._store.release_upload_id(self.id)
        logger.warning(
            "Discarded parameter set %s for model %s@%d and deleted its %d stored arrays because %s",
            self.id,
            self._model,
            self._model_version,
            len(self._committed_keys),
            reason,
        )

    def _finish_array(self) -> None:
        if self._receiver is None:
            return
        header = self._receiver.header
        try:
            digest = self._receiver.finish()
        except IntegrityError as error:
            raise InvalidArgument(
                f"{error} The bytes changed in transit or the header's sha256 is wrong; send the array again."
            ) from error

        self._writer.commit()
        self._committed_keys.append(self._writer.key)
        self._arrays.append(
            ArrayRecord(
                name=header.name,
                dtype=validate_header(header).str,
                shape=tuple(header.shape),
                nbytes=header.nbytes,
                sha256=digest,
                role=header.role,
            )
        )
        self._writer = None
        self._receiver = None
