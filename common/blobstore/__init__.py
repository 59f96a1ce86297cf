"""Blob storage behind one small interface, with a backend chosen by URL.

``file:///path`` or a plain path selects :class:`LocalBlobStore`, the embedded default.
"""

import os
import pathlib

from lasagne_engine.blobstore.base import BlobStore, BlobWriter
from lasagne_engine.blobstore.local import LocalBlobStore

__all__ = ["BlobStore", "BlobWriter", "LocalBlobStore", "open_blob_store"]


def open_blob_store(url: str | os.PathLike) -> BlobStore:
    """Open the blob store that ``url`` names.

    Raises
    ------
    ValueError
        If the URL's scheme has no backend.
    """
    text = os.fspath(url)
    if text.startswith("file://"):
        return LocalBlobStore(pathlib.Path(text.removeprefix("file://")))
    if "://" in text:
        scheme = text.split("://", 1)[0]
        # TODO: an S3 backend for s3:// URLs; until then only local folders are accepted.
        raise ValueError(f"No blob store backend for scheme {scheme!r} in {text!r}; use a local folder path.")
    return LocalBlobStore(pathlib.Path(text))
