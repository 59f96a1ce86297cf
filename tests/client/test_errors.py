import grpc
import pytest

from lasagne_engine.client.errors import (
    AlreadyExistsError,
    DataLossError,
    DeadlineExceededError,
    EngineError,
    FailedPreconditionError,
    IntegrityError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
    from_rpc_error,
)


class StatusError(grpc.RpcError):
    """An RpcError carrying a status, as a failed stub call raises."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__()
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    ("code", "error_class"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError),
        (grpc.StatusCode.NOT_FOUND, NotFoundError),
        (grpc.StatusCode.ALREADY_EXISTS, AlreadyExistsError),
        (grpc.StatusCode.FAILED_PRECONDITION, FailedPreconditionError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhaustedError),
        (grpc.StatusCode.UNAVAILABLE, UnavailableError),
        (grpc.StatusCode.DATA_LOSS, DataLossError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceededError),
    ],
    ids=lambda value: value.name if isinstance(value, grpc.StatusCode) else None,
)
def test_from_rpc_error_maps_code(code, error_class):
    error = from_rpc_error(StatusError(code, "No model 'resnt' in the registry."))

    assert type(error) is error_class
    assert error.code == code
    assert error.details == "No model 'resnt' in the registry."
    assert str(error) == "No model 'resnt' in the registry."


def test_from_rpc_error_other_code_is_base_class():
    error = from_rpc_error(StatusError(grpc.StatusCode.INTERNAL, "RegisterModel failed: KeyError: 'x'"))

    assert type(error) is EngineError
    assert error.code == grpc.StatusCode.INTERNAL
    assert str(error) == "RegisterModel failed: KeyError: 'x'"


def test_from_rpc_error_empty_details_names_code():
    error = from_rpc_error(StatusError(grpc.StatusCode.NOT_FOUND, ""))

    assert str(error) == "The call failed with status NOT_FOUND and no details."


def test_from_rpc_error_without_status():
    error = from_rpc_error(grpc.RpcError("channel closed"))

    assert type(error) is EngineError
    assert error.code == grpc.StatusCode.UNKNOWN
    assert str(error) == "channel closed"


def test_integrity_error_names_array_and_digests():
    error = IntegrityError("X_train", "a" * 64, "b" * 64, source="dataset 'digits@2'")

    assert isinstance(error, EngineError)
    assert error.code == grpc.StatusCode.DATA_LOSS
    assert (error.array, error.expected_sha256, error.actual_sha256) == ("X_train", "a" * 64, "b" * 64)
    assert str(error).startswith(
        f"Downloaded array 'X_train' of dataset 'digits@2' has sha256 {'b' * 64}, but its header recorded {'a' * 64}."
    )
