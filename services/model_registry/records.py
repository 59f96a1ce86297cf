"""The records the registry stores and returns, and the blob keys of their bytes."""

import dataclasses
import re
import uuid

from lasagne_engine.errors import InvalidArgument

PARAMETER_SETS_PREFIX = "parameter-sets/"
PARAMETER_SET_ID_PATTERN = re.compile(r"ps-[0-9a-f]{12}")
ARRAY_ROLES = ("", "trainable", "state", "optimizer")


@dataclasses.dataclass(frozen=True)
class ModelVersion:
    """One registered version of a model definition."""

    name: str
    version: int
    source_sha256: str
    description: str
    default_hyperparameters: dict
    signature: dict
    created_at: float
    # None where the caller did not ask for the source (listings).
    source: str | None = None
    # False when registration returned an existing version with identical source.
    created: bool = False
    # Blob key of the source; empty only in records built outside the store.
    source_key: str = ""


@dataclasses.dataclass(frozen=True)
class ArrayRecord:
    """One stored array of a parameter set."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    sha256: str
    role: str


@dataclasses.dataclass(frozen=True)
class ParameterSetInfo:
    """Metadata a caller gives for a parameter set before sending its arrays."""

    model: str
    session_id: str = ""
    epoch: int = 0
    step: int = 0
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    tags: tuple[str, ...] = ()
    parent_id: str = ""


@dataclasses.dataclass(frozen=True)
class ParameterSet:
    """A stored parameter set: its metadata and the arrays it contains, in upload order."""

    id: str
    model: str
    model_version: int
    session_id: str
    epoch: int
    step: int
    metrics: dict[str, float]
    tags: tuple[str, ...]
    parent_id: str
    arrays: tuple[ArrayRecord, ...]
    total_bytes: int
    created_at: float
    # Sessions that hold the set, which keeps it from being deleted.
    held_by: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ParameterSetHold:
    """A session's hold on a parameter set; ``created_at`` is in seconds since the Unix epoch."""

    set_id: str
    session_id: str
    created_at: float


@dataclasses.dataclass(frozen=True)
class DeletedModel:
    """Model versions and parameter sets removed by one model deletion."""

    versions: tuple[int, ...]
    parameter_set_ids: tuple[str, ...]


MODELS_PREFIX = "models/"
MAX_SESSION_ID_LENGTH = 128


# The file name of a source blob written since sources got unique keys: "source-" and a uuid4 hex.
_UNIQUE_SOURCE_FILE = re.compile(r"source-[0-9a-f]{32}\.py")
# The file name of a source blob of a version registered before that, which is its version number.
_LEGACY_SOURCE_FILE = re.compile(r"[0-9]+\.py")


def model_source_key(name: str, version: int) -> str:
    """Return the source key that versions registered before unique source keys use.

    Rows of those versions have no ``source_key``. The key depends only on the version number, so
    new registrations use :func:`new_model_source_key` instead.
    """
    return f"{MODELS_PREFIX}{name}/{version}.py"


def new_model_source_key(name: str) -> str:
    """Return a source key that no other registration uses, even of the same version number."""
    return f"{MODELS_PREFIX}{name}/source-{uuid.uuid4().hex}.py"


def is_model_source_key(key: str) -> bool:
    """Return whether ``key`` has the form of a model source key, legacy or unique."""
    parts = key.removeprefix(MODELS_PREFIX).split("/")
    if not key.startswith(MODELS_PREFIX) or len(parts) != 2:
        return False
    return bool(_UNIQUE_SOURCE_FILE.fullmatch(parts[1]) or _LEGACY_SOURCE_FILE.fullmatch(parts[1]))


def validate_session_id(session_id: str) -> str:
    """Return ``session_id`` if it is a non-empty printable string of up to 128 characters.

    Raises
    ------
    InvalidArgument
        If it is empty, too long or contains non-printable characters.
    """
    if not session_id or len(session_id) > MAX_SESSION_ID_LENGTH or not session_id.isprintable():
        raise InvalidArgument(
            f"Invalid session id {session_id!r}: give the id of the session that uses the parameter set, "
            f"1 to {MAX_SESSION_ID_LENGTH} printable characters."
        )
    return session_id


def array_key(set_id: str, array_name: str) -> str:
    return f"{PARAMETER_SETS_PREFIX}{set_id}/{array_name}"


def validate_parameter_set_id(set_id: str) -> str:
    """Return ``set_id`` if it has the form ``ps-`` followed by 12 lowercase hex digits.

    Raises
    ------
    InvalidArgument
        If it has another form.
    """
    if not PARAMETER_SET_ID_PATTERN.fullmatch(set_id):
        raise InvalidArgument(
            f"Invalid parameter set id {set_id!r}: ids have the form 'ps-' followed by 12 lowercase hex digits, "
            "as returned by SaveParameterSet and ListParameterSets."
        )
    return set_id
