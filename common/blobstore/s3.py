"""Blob store backend on MinIO or any S3-compatible endpoint, through the ``minio`` SDK.

Objects live in one bucket under an optional key prefix. A write buffers up to one part in
memory. An object that fits in one part is stored with a single PUT, and a larger one with a
multipart upload whose parts go out as the buffer fills. Either way S3 makes the object visible
only when the PUT or the CompleteMultipartUpload succeeds, so no reader ever sees half an object.

Every request is retried on its own, with exponential backoff and jitter, when the failure is
transient: a refused or dropped connection, a timeout, or a 5xx response such as ``SlowDown``. A
failed part is sent again without resending the parts before it, and an interrupted download
resumes at the byte where it stopped. Once the attempts run out, the store raises
:class:`BlobStoreUnavailable`, and the services return UNAVAILABLE until the storage is back. A
full storage raises :class:`BlobStoreFull`, which they return as RESOURCE_EXHAUSTED.
"""

import dataclasses
import io
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO, TypeVar

import certifi
import prometheus_client
import urllib3
from minio import Minio
from minio.credentials import Provider
from minio.datatypes import Part
from minio.error import InvalidResponseError, S3Error, ServerError

from lasagne_engine.blobstore.base import BlobStore, BlobStoreFull, BlobStoreUnavailable, BlobWriter

__all__ = ["DEFAULT_PART_BYTES", "MAX_PART_BYTES", "MIN_PART_BYTES", "S3BlobStore", "S3Location"]

logger = logging.getLogger(__name__)

# S3 rejects parts below 5 MiB, except the last one, and above 5 GiB.
MIN_PART_BYTES = 5 << 20
MAX_PART_BYTES = 5 << 30
# 16 MiB parts keep a 2 GiB array at 128 parts, far below S3's limit of 10,000, while each
# upload in flight holds at most one part in memory.
DEFAULT_PART_BYTES = 16 << 20
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MAX_ATTEMPTS = 6
DEFAULT_BACKOFF_S = 0.25
MAX_BACKOFF_S = 8.0

# S3 error codes worth retrying: the server was busy, restarting or lost a quorum for a moment.
_TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "OperationAborted",
        "RequestTimeout",
        "ServiceUnavailable",
        "SlowDown",
        "XMinioServerNotInitialized",
        "XMinioReadQuorum",
        "XMinioWriteQuorum",
    }
)
# S3 error codes that mean there is no room for the object.
_FULL_CODES = frozenset(
    {"EntityTooLarge", "QuotaExceeded", "XMinioAdminBucketQuotaExceeded", "XMinioStorageFull"}
)
_INSUFFICIENT_STORAGE_STATUS = 507
# S3 error codes that mean the object does not exist, which the store raises as KeyError.
_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchObject", "NotFound"})

RETRIES = prometheus_client.Counter(
    "lasagne_engine_blob_store_retries",
    "Requests to the S3 blob store that failed transiently and were sent again.",
    ["operation"],
)

Result = TypeVar("Result")


@dataclasses.dataclass(frozen=True)
class S3Location:
    """Bucket, key prefix and endpoint of an S3 blob store.

    Attributes
    ----------
    bucket : str
        Bucket name.
    prefix : str
        Key prefix inside the bucket, empty or ending in ``/``.
    endpoint : str
        ``host:port`` of the S3 API.
    secure : bool
        Whether to use TLS.
    region : str or None
        Region of the bucket, or None to let the SDK ask the server.
    """

    bucket: str
    prefix: str
    endpoint: str
    secure: bool
    region: str | None = None

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


class _Missing(Exception):
    """The object does not exist; raised inside retried operations and turned into KeyError."""


class S3BlobStore(BlobStore):
    """Stores each object as ``prefix + key`` in one bucket of an S3 endpoint.

    Parameters
    ----------
    location : S3Location
        Bucket, key prefix, endpoint and TLS.
    credentials : minio.credentials.Provider, optional
        Where the access key comes from. Default: anonymous access.
    part_bytes : int
        Size of the parts of a multipart upload; an object up to this size is stored with one
        PUT. S3 requires at least 5 MiB for every part but the last. Default 16 MiB.
    timeout_s : float
        Connect and read timeout of each request in seconds. Default 60.
    max_attempts : int
        Attempts of each request before the store reports the storage unavailable. Default 6.
    backoff_s : float
        Pause before the first retry; each later pause doubles, up to 8 s, with random jitter
        that shortens it by up to half. Default 0.25.
    cert_check : bool
        Whether to verify the server's TLS certificate against ``SSL_CERT_FILE`` or certifi's
        bundle. Default True.

    Notes
    -----
    The minio SDK 7.2 offers multipart uploads only inside ``put_object``, which retries nothing
    itself and restarts the whole object when one part fails. This store therefore drives the
    SDK's multipart primitives (``_create_multipart_upload``, ``_upload_part``,
    ``_complete_multipart_upload``, ``_abort_multipart_upload``) directly. They are private in the
    SDK, so the version is pinned exactly in ``pyproject.toml``.
    """

    def __init__(
        self,
        location: S3Location,
        *,
        credentials: Provider | None = None,
        part_bytes: int = DEFAULT_PART_BYTES,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        backoff_s: float = DEFAULT_BACKOFF_S,
        cert_check: bool = True,
    ):
        if part_bytes <= 0 or part_bytes > MAX_PART_BYTES:
            raise ValueError(f"part_bytes={part_bytes} must be positive and at most 5 GiB ({MAX_PART_BYTES}).")
        if max_attempts < 1:
            raise ValueError(f"max_attempts={max_attempts} must be at least 1.")
        if location.prefix and not location.prefix.endswith("/"):
            raise ValueError(f"The key prefix {location.prefix!r} must be empty or end with '/'.")

        self.location = location
        self.part_bytes = part_bytes
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        # The SDK's default pool retries 5xx responses itself. Retries happen here instead, one
        # request at a time, so that each is logged and counted and a part is never sent twice
        # by two layers.
        http_client = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s),
            maxsize=32,
            cert_reqs="CERT_REQUIRED" if cert_check else "CERT_NONE",
            ca_certs=_ca_certificates(),
            retries=urllib3.Retry(total=0, redirect=0, raise_on_status=False),
        )
        self._http = http_client
        self.client = Minio(
            location.endpoint,
            secure=location.secure,
            region=location.region,
            credentials=credentials,
            http_client=http_client,
        )

    def __repr__(self) -> str:
        scheme = "https" if self.location.secure else "http"
        return f"S3BlobStore({self.location.url!r} at {scheme}://{self.location.endpoint})"

    @property
    def url(self) -> str:
        return self.location.url

    def close(self) -> None:
        """Close the pooled connections; later requests open new ones."""
        self._http.clear()

    # Setup --------------------------------------------------------------------------------------

    def ensure_bucket(self) -> None:
        """Create the bucket unless it exists.

        Raises
        ------
        BlobStoreUnavailable
            If the endpoint cannot be reached, or the bucket is missing and cannot be created.
        """
        bucket = self.location.bucket
        if self._retrying("check bucket", lambda: self.client.bucket_exists(bucket)):
            return
        self._retrying("create bucket", lambda: self.client.make_bucket(bucket, location=self.location.region))
        logger.info("Created bucket %r at %s", bucket, self.location.endpoint)

    # BlobStore ----------------------------------------------------------------------------------

    def writer(self, key: str) -> BlobWriter:
        return S3BlobWriter(self, key)

    def open(self, key: str, offset: int = 0) -> BinaryIO:
        size, etag = self._stat(key)
        if not 0 <= offset <= size:
            raise ValueError(f"Offset {offset} is outside blob {key!r} of {size} bytes.")
        return io.BufferedReader(_S3Reader(self, key, size=size, etag=etag, offset=offset), buffer_size=1 << 16)

    def size(self, key: str) -> int:
        return self._stat(key)[0]

    def delete(self, key: str) -> None:
        name = self._object_name(key)
        self._retrying(f"delete {key!r}", lambda: self.client.remove_object(self.location.bucket, name))

    def list(self, prefix: str) -> Iterator[str]:
        full_prefix = self._object_name(prefix)
        names = self._retrying(
            f"list {prefix!r}",
            lambda: [
                item.object_name
                for item in self.client.list_objects(self.location.bucket, prefix=full_prefix, recursive=True)
            ],
        )
        start = len(self.location.prefix)
        yield from sorted(name[start:] for name in names)

    def abort_incomplete_writes(self, prefix: str, *, keep: Callable[[str], bool]) -> int:
        full_prefix = self._object_name(prefix)
        aborted = 0
        key_marker = None
        # Each page lists up to 1,000 uploads. The SDK drops the upload-id marker of a truncated
        # page, so paging goes by key only. Uploads of one key beyond one page wait for the next run.
        for _ in range(1000):
            page = self._retrying(
                f"list incomplete uploads under {prefix!r}",
                lambda: self.client._list_multipart_uploads(
                    self.location.bucket, prefix=full_prefix, key_marker=key_marker
                ),
            )
            for upload in page.uploads:
                if keep(upload.object_name[len(self.location.prefix) :]):
                    continue
                self._abort_upload(upload.object_name, upload.upload_id)
                aborted += 1
            if not page.is_truncated or not page.next_key_marker:
                break
            key_marker = page.next_key_marker
        if aborted:
            logger.warning(
                "Aborted %d incomplete multipart uploads under %s%s left by processes that stopped mid-write",
                aborted,
                self.location.url,
                prefix,
            )
        return aborted

    # Requests -----------------------------------------------------------------------------------

    def _object_name(self, key: str) -> str:
        return self.location.prefix + key

    def _stat(self, key: str) -> tuple[int, str]:
        name = self._object_name(key)

        def stat() -> tuple[int, str]:
            try:
                info = self.client.stat_object(self.location.bucket, name)
            except S3Error as error:
                if error.code in _MISSING_CODES:
                    raise _Missing(key) from error
                raise
            return int(info.size or 0), info.etag or ""

        try:
            return self._retrying(f"look up {key!r}", stat)
        except _Missing as error:
            raise KeyError(key) from error

    def _abort_upload(self, name: str, upload_id: str) -> None:
        try:
            self._retrying(
                f"abort the upload of {name!r}",
                lambda: self.client._abort_multipart_upload(self.location.bucket, name, upload_id),
            )
        except BlobStoreUnavailable:
            # The upload stays invisible; the next garbage collection aborts it.
            logger.warning("Failed to abort multipart upload %s of %s; gc will try again", upload_id, name)

    def _retrying(
        self, operation: str, call: Callable[[], Result], *, accept: Callable[[Exception], bool] | None = None
    ) -> Result:
        """Run ``call`` until it succeeds, retrying transient failures with backoff.

        ``accept`` may turn an error of a retried attempt into success, for a request that may
        have taken effect although its response was lost.
        """
        started = time.monotonic()
        for attempt in range(1, self.max_attempts + 1):
            try:
                return call()
            except _Missing:
                raise
            except Exception as error:  # noqa: BLE001 - storage failures become domain errors below
                if attempt > 1 and accept is not None and accept(error):
                    return None  # type: ignore[return-value]
                kind = _classify(error)
                if kind is None:
                    raise
                if kind == "full":
                    raise BlobStoreFull(
                        f"The S3 blob store {self.location.url} at {self.location.endpoint} has no room to "
                        f"{operation}: {_describe(error)}. Free space in the bucket or raise its quota."
                    ) from error
                if kind == "fatal":
                    raise BlobStoreUnavailable(
                        f"The S3 blob store {self.location.url} at {self.location.endpoint} rejected the request "
                        f"to {operation}: {_describe(error)}. Check the bucket, the credentials "
                        "(AWS_ACCESS_KEY_ID or MINIO_ROOT_USER) and LASAGNE_ENGINE_S3_ENDPOINT."
                    ) from error
                if attempt == self.max_attempts:
                    raise BlobStoreUnavailable(
                        f"The S3 blob store {self.location.url} at {self.location.endpoint} failed to {operation} "
                        f"after {attempt} attempts in {time.monotonic() - started:.1f} s: {_describe(error)}. "
                        "Check that the endpoint is up and reachable; the call succeeds once it is."
                    ) from error
                delay_s = min(self.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S) * random.uniform(0.5, 1.0)
                RETRIES.labels(operation=operation.split(" ", 1)[0]).inc()
                logger.warning(
                    "S3 blob store %s failed to %s (attempt %d of %d): %s; retrying in %.2f s",
                    self.location.url,
                    operation,
                    attempt,
                    self.max_attempts,
                    _describe(error),
                    delay_s,
                )
                time.sleep(delay_s)
        raise AssertionError("unreachable: the loop returns or raises")


class S3BlobWriter(BlobWriter):
    """Buffers one part at a time and sends it as the buffer fills."""

    def __init__(self, store: S3BlobStore, key: str):
        self.key = key
        self._store = store
        self._name = store._object_name(key)
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[Part] = []
        self._size = 0
        self._done = False

    def write(self, data: bytes | memoryview) -> None:
        if self._done:
            raise RuntimeError(f"Blob {self.key!r} is already committed or aborted.")
        self._buffer += data
        self._size += len(data)
        part_bytes = self._store.part_bytes
        # A full buffer is sent only once more bytes arrive, so that an object of exactly one
        # part is stored with one PUT.
        while len(self._buffer) > part_bytes:
            with memoryview(self._buffer) as view:
                part = bytes(view[:part_bytes])
            del self._buffer[:part_bytes]
            self._send_part(part)

    def commit(self) -> None:
        if self._done:
            raise RuntimeError(f"Blob {self.key!r} is already committed or aborted.")
        store = self._store
        bucket = store.location.bucket
        try:
            if self._upload_id is None:
                body = bytes(self._buffer)
                store._retrying(
                    f"store {self.key!r}",
                    lambda: store.client._put_object(
                        bucket, self._name, body, headers={"Content-Type": "application/octet-stream"}
                    ),
                )
            else:
                if self._buffer:
                    self._send_part(bytes(self._buffer))
                store._retrying(
                    f"complete {self.key!r}",
                    lambda: store.client._complete_multipart_upload(bucket, self._name, self._upload_id, self._parts),
                    accept=self._completed_meanwhile,
                )
        except BaseException:
            self.abort()
            raise
        self._buffer = bytearray()
        self._done = True

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._buffer = bytearray()
        if self._upload_id is not None:
            self._store._abort_upload(self._name, self._upload_id)

    def _send_part(self, body: bytes) -> None:
        store = self._store
        bucket = store.location.bucket
        if self._upload_id is None:
            self._upload_id = store._retrying(
                f"start a multipart upload of {self.key!r}",
                lambda: store.client._create_multipart_upload(
                    bucket, self._name, {"Content-Type": "application/octet-stream"}
                ),
            )
        number = len(self._parts) + 1
        # Sending a part number again replaces the part, so a retry after a lost response is safe.
        etag = store._retrying(
            f"upload part {number} of {self.key!r}",
            lambda: store.client._upload_part(bucket, self._name, body, None, self._upload_id, number),
        )
        self._parts.append(Part(number, etag))

    def _completed_meanwhile(self, error: Exception) -> bool:
        # A CompleteMultipartUpload whose response was lost took effect, so its retry finds the
        # upload gone. The object is then whole if it has every byte written.
        if not (isinstance(error, S3Error) and error.code == "NoSuchUpload"):
            return False
        try:
            size, _ = self._store._stat(self.key)
        except (KeyError, BlobStoreUnavailable):
            return False
        return size == self._size


class _S3Reader(io.RawIOBase):
    """Reads an object sequentially, resuming at the current byte after a broken connection."""

    def __init__(self, store: S3BlobStore, key: str, *, size: int, etag: str, offset: int):
        self._store = store
        self._key = key
        self._size = size
        self._etag = etag
        self._position = offset
        self._response: urllib3.BaseHTTPResponse | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._position >= self._size:
            return 0
        with memoryview(buffer) as view:
            wanted = min(len(view), self._size - self._position)
            try:
                count = self._store._retrying(
                    f"read {self._key!r} at byte {self._position}", lambda: self._read_some(view[:wanted])
                )
            except _Missing as error:
                # Deleted after open(), as when a delete races a download: the same error as a
                # missing object at open(), so callers tell it apart from an unreachable store.
                logger.warning("Blob %s of %s was deleted while it was being read", self._key, self._store.location.url)
                raise KeyError(self._key) from error
        self._position += count
        return count

    def close(self) -> None:
        self._release()
        super().close()

    def _read_some(self, view: memoryview) -> int:
        if self._response is None:
            # If-Match fails the request, instead of mixing bytes, should the object change.
            try:
                self._response = self._store.client.get_object(
                    self._store.location.bucket,
                    self._store._object_name(self._key),
                    offset=self._position,
                    request_headers={"If-Match": self._etag} if self._etag else None,
                )
            except S3Error as error:
                if error.code in _MISSING_CODES:
                    raise _Missing(self._key) from error
                raise
        try:
            count = self._response.readinto(view)
            if count == 0:
                raise urllib3.exceptions.ProtocolError(
                    f"The response ended at byte {self._position} of {self._size}."
                )
        except BaseException:
            self._release()
            raise
        return count

    def _release(self) -> None:
        if self._response is not None:
            self._response.close()
            self._response.release_conn()
            self._response = None


def _classify(error: Exception) -> str | None:
    """Return ``"transient"``, ``"full"`` or ``"fatal"`` for a failed request, or None for a bug here."""
    if isinstance(error, S3Error):
        if error.code in _FULL_CODES:
            return "full"
        status = error.response.status if error.response is not None else 0
        if error.code in _TRANSIENT_CODES or status >= 500:
            return "transient"
        return "fatal"
    if isinstance(error, ServerError):
        if error.status_code == _INSUFFICIENT_STORAGE_STATUS:
            return "full"
        return "transient" if error.status_code >= 500 else "fatal"
    if isinstance(error, InvalidResponseError):
        return "transient" if getattr(error, "_code", 0) >= 500 else "fatal"
    if isinstance(error, (urllib3.exceptions.HTTPError, OSError)):
        return "transient"
    return None


def _describe(error: Exception) -> str:
    if isinstance(error, S3Error):
        return f"{error.code}: {error.message}"
    return f"{type(error).__name__}: {error}"


def _ca_certificates() -> str:
    return os.environ.get("SSL_CERT_FILE") or certifi.where()
