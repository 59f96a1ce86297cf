"""The records the registry stores and returns, and the blob keys of their bytes."""

import dataclasses
import re

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


def model_source_key(name: str, version: int) -> str:
    return f"models/{name}/{version}.py"


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
