"""Blob storage behind one small interface, with a backend chosen by URL.

``s3://bucket/prefix`` selects :class:`S3BlobStore` (MinIO or any S3 endpoint); ``file:///path``
or a plain path selects :class:`LocalBlobStore`, the embedded default. The settings that go with
a URL are listed in :mod:`lasagne_engine.blobstore.settings`.
"""

from lasagne_engine.blobstore.base import (
    RETRYABLE_BLOB_ERRORS,
    BlobStore,
    BlobStoreError,
    BlobStoreFull,
    BlobStoreUnavailable,
    BlobWriter,
)
from lasagne_engine.blobstore.local import LocalBlobStore
from lasagne_engine.blobstore.s3 import S3BlobStore, S3Location
from lasagne_engine.blobstore.settings import configured_blob_store, open_blob_store

__all__ = [
    "RETRYABLE_BLOB_ERRORS",
    "BlobStore",
    "BlobStoreError",
    "BlobStoreFull",
    "BlobStoreUnavailable",
    "BlobWriter",
    "LocalBlobStore",
    "S3BlobStore",
    "S3Location",
    "configured_blob_store",
    "open_blob_store",
]
