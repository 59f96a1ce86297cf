"""Choosing the blob store from the environment and the ``[blob_store]`` table of the config file.

The services read these settings; the environment wins over the file:

=================================  ==================  ===========================================
variable                           ``[blob_store]``    meaning
=================================  ==================  ===========================================
``LASAGNE_ENGINE_BLOB_URL``        ``url``             ``s3://bucket/prefix``, ``file:///path`` or a
                                                       folder; unset keeps each service's local folder
``LASAGNE_ENGINE_S3_ENDPOINT``     ``endpoint``        ``host:port`` of the S3 API, or a URL with
                                                       ``http://`` or ``https://``
``LASAGNE_ENGINE_S3_SECURE``       ``secure``          ``true`` or ``false``: TLS (default true)
``AWS_REGION``                     ``region``          region of the bucket (default: ask the server)
``AWS_ACCESS_KEY_ID``,             ``access_key``,     credentials; ``MINIO_ROOT_USER`` and
``AWS_SECRET_ACCESS_KEY``          ``secret_key``      ``MINIO_ROOT_PASSWORD`` work as well
``LASAGNE_ENGINE_S3_PART_BYTES``   ``part_bytes``      multipart part size, 5 MiB to 5 GiB (16 MiB)
``LASAGNE_ENGINE_S3_TIMEOUT_S``    ``timeout_s``       connect and read timeout per request (60 s)
=================================  ==================  ===========================================

The config file is the one the servers read their other settings from (``$LASAGNE_ENGINE_CONFIG``
or ``<home>/config.toml``). Without credentials in either place, the store falls back to
``~/.aws/credentials`` (``AWS_PROFILE``) and then to anonymous access.
"""

import logging
import os
import pathlib
import tomllib
from collections.abc import Mapping
from urllib.parse import urlsplit

from minio.credentials import AWSConfigProvider, ChainedProvider, Provider, StaticProvider

from lasagne_engine.blobstore.base import BlobStore, BlobStoreUnavailable
from lasagne_engine.blobstore.local import LocalBlobStore
from lasagne_engine.blobstore.s3 import (
    DEFAULT_PART_BYTES,
    DEFAULT_TIMEOUT_S,
    MAX_PART_BYTES,
    MIN_PART_BYTES,
    S3BlobStore,
    S3Location,
)

__all__ = ["configured_blob_store", "open_blob_store"]

logger = logging.getLogger(__name__)

DEFAULT_S3_ENDPOINT = "s3.amazonaws.com"

# Setting name in the file, environment variables in order of preference.
_VARIABLES = {
    "url": ("LASAGNE_ENGINE_BLOB_URL",),
    "endpoint": ("LASAGNE_ENGINE_S3_ENDPOINT",),
    "secure": ("LASAGNE_ENGINE_S3_SECURE",),
    "region": ("AWS_REGION", "AWS_DEFAULT_REGION"),
    "part_bytes": ("LASAGNE_ENGINE_S3_PART_BYTES",),
    "timeout_s": ("LASAGNE_ENGINE_S3_TIMEOUT_S",),
}
# Credentials: a key and its secret come from one pair of variables, never half from each.
_CREDENTIAL_VARIABLES = (
    ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"),
    ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", None),
    ("MINIO_ACCESS_KEY", "MINIO_SECRET_KEY", None),
)
_FILE_KEYS = frozenset({*_VARIABLES, "access_key", "secret_key", "session_token"})


def configured_blob_store(
    config_file: pathlib.Path | None = None, *, environ: Mapping[str, str] | None = None
) -> BlobStore | None:
    """Open the blob store the settings name, or return None when they name none.

    With None, each service keeps its blobs in its own local folder. An S3 bucket that does not
    exist yet is created. An endpoint that cannot be reached now is logged as a warning and
    not raised, so the services start and return UNAVAILABLE until it is back.

    Parameters
    ----------
    config_file : pathlib.Path, optional
        TOML file whose ``[blob_store]`` table, if any, holds settings. A missing file counts as
        empty. Default: no file.
    environ : mapping, optional
        The environment. Default ``os.environ``.

    Raises
    ------
    ValueError
        If a setting is invalid; the message names it and the accepted values.
    """
    settings = _read_settings(config_file, os.environ if environ is None else environ)
    url = settings.get("url")
    if not url:
        return None
    store = open_blob_store(url, settings=settings)
    if isinstance(store, S3BlobStore):
        try:
            store.ensure_bucket()
        except BlobStoreUnavailable as error:
            logger.warning("Could not check the bucket of %r at startup: %s", store, error)
    logger.info("Blobs are stored in %r", store)
    return store


def open_blob_store(url: str | os.PathLike, *, settings: Mapping[str, str] | None = None) -> BlobStore:
    """Open the blob store that ``url`` names, without contacting it.

    Parameters
    ----------
    url : str or path-like
        ``s3://bucket/prefix``, ``file:///path`` or a plain folder path.
    settings : mapping, optional
        The S3 settings of the table in this module's documentation, by their file key.
        Default: read from the environment.

    Raises
    ------
    ValueError
        If the scheme has no backend or a setting is invalid.
    """
    text = os.fspath(url)
    if text.startswith("file://"):
        return LocalBlobStore(pathlib.Path(text.removeprefix("file://")))
    if text.startswith("s3://"):
        if settings is None:
            settings = _read_settings(None, os.environ)
        return _s3_store(text, settings)
    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise ValueError(
            f"No blob store backend for scheme {scheme!r} in {text!r}; use s3://bucket/prefix, "
            "file:///path or a folder path."
        )
    return LocalBlobStore(pathlib.Path(text))


def _read_settings(config_file: pathlib.Path | None, environ: Mapping[str, str]) -> dict[str, str]:
    settings: dict[str, str] = {}
    if config_file is not None:
        settings.update(_read_file(pathlib.Path(config_file)))

    for key, variables in _VARIABLES.items():
        for variable in variables:
            if environ.get(variable):
                settings[key] = environ[variable]
                break
    for key_variable, secret_variable, token_variable in _CREDENTIAL_VARIABLES:
        if environ.get(key_variable) and environ.get(secret_variable):
            settings["access_key"] = environ[key_variable]
            settings["secret_key"] = environ[secret_variable]
            settings["session_token"] = environ.get(token_variable, "") if token_variable else ""
            break
    return settings


def _read_file(path: pathlib.Path) -> dict[str, str]:
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"Config file {str(path)!r} is not valid TOML: {error}.") from error

    table = document.get("blob_store", {})
    if not isinstance(table, dict):
        raise ValueError(f"Config file {str(path)!r} has a blob_store key that is not a table; write [blob_store].")
    unknown = sorted(set(table) - _FILE_KEYS)
    if unknown:
        raise ValueError(
            f"Config file {str(path)!r} has unknown keys {unknown} in [blob_store]; the keys are {sorted(_FILE_KEYS)}."
        )
    return {key: str(value).lower() if isinstance(value, bool) else str(value) for key, value in table.items()}


def _s3_store(url: str, settings: Mapping[str, str]) -> S3BlobStore:
    parts = urlsplit(url)
    bucket = parts.netloc
    if not bucket or not 3 <= len(bucket) <= 63 or bucket != bucket.lower():
        raise ValueError(
            f"Invalid bucket {bucket!r} in blob URL {url!r}: write s3://bucket/prefix with a bucket name of "
            "3 to 63 lowercase letters, digits, dots and hyphens."
        )
    prefix = parts.path.strip("/")
    prefix = f"{prefix}/" if prefix else ""

    endpoint = settings.get("endpoint", DEFAULT_S3_ENDPOINT)
    secure = _parse_bool(settings.get("secure", "true"), "LASAGNE_ENGINE_S3_SECURE")
    if "://" in endpoint:
        endpoint_parts = urlsplit(endpoint)
        if endpoint_parts.scheme not in ("http", "https") or not endpoint_parts.netloc:
            raise ValueError(
                f"Invalid LASAGNE_ENGINE_S3_ENDPOINT {endpoint!r}: give host:port, http://host:port or https://host:port."
            )
        if "secure" not in settings:
            secure = endpoint_parts.scheme == "https"
        endpoint = endpoint_parts.netloc

    part_bytes = _parse_int(settings.get("part_bytes"), DEFAULT_PART_BYTES, "LASAGNE_ENGINE_S3_PART_BYTES")
    if not MIN_PART_BYTES <= part_bytes <= MAX_PART_BYTES:
        raise ValueError(
            f"LASAGNE_ENGINE_S3_PART_BYTES={part_bytes} is outside the part sizes S3 accepts; "
            f"give {MIN_PART_BYTES} (5 MiB) to {MAX_PART_BYTES} (5 GiB)."
        )
    timeout_text = settings.get("timeout_s") or str(DEFAULT_TIMEOUT_S)
    try:
        timeout_s = float(timeout_text)
    except ValueError as error:
        raise ValueError(f"LASAGNE_ENGINE_S3_TIMEOUT_S={timeout_text!r} is not a number of seconds.") from error
    if not timeout_s > 0:
        raise ValueError(f"LASAGNE_ENGINE_S3_TIMEOUT_S={timeout_s:g} must be a positive number of seconds.")

    location = S3Location(
        bucket=bucket, prefix=prefix, endpoint=endpoint, secure=secure, region=settings.get("region") or None
    )
    return S3BlobStore(location, credentials=_credentials(settings), part_bytes=part_bytes, timeout_s=timeout_s)


def _credentials(settings: Mapping[str, str]) -> Provider | None:
    access_key = settings.get("access_key")
    secret_key = settings.get("secret_key")
    if access_key and secret_key:
        return StaticProvider(access_key, secret_key, settings.get("session_token") or None)
    if access_key or secret_key:
        raise ValueError(
            "Only half of the S3 credentials are set; give both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or MINIO_ROOT_USER and MINIO_ROOT_PASSWORD, or access_key and secret_key in [blob_store])."
        )
    shared_file = pathlib.Path(
        os.environ.get("AWS_SHARED_CREDENTIALS_FILE", pathlib.Path.home() / ".aws" / "credentials")
    )
    if shared_file.is_file():
        return ChainedProvider([AWSConfigProvider()])
    return None


def _parse_bool(text: str, name: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={text!r} is not a boolean; write true or false.")


def _parse_int(text: str | None, default: int, name: str) -> int:
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError as error:
        raise ValueError(f"{name}={text!r} is not an integer.") from error
