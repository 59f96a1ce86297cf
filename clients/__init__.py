"""Python client of the LasagneEngine model registry, data service and trainer."""

from lasagne_engine.client.engine import FINAL_STATES, Engine, state_name
from lasagne_engine.client.errors import (
    AlreadyExistsError,
    DataLossError,
    DeadlineExceededError,
    EngineError,
    FailedPreconditionError,
    IntegrityError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    from_rpc_error,
)

__all__ = [
    "FINAL_STATES",
    "AlreadyExistsError",
    "DataLossError",
    "DeadlineExceededError",
    "Engine",
    "EngineError",
    "FailedPreconditionError",
    "IntegrityError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "from_rpc_error",
    "state_name",
]
