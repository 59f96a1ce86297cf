"""Exceptions the client SDK raises, one per gRPC status code that callers branch on.

::

    EngineError                  any other code (UNKNOWN, INTERNAL, CANCELLED, ...)
    ├── InvalidArgumentError     INVALID_ARGUMENT
    ├── NotFoundError            NOT_FOUND
    ├── AlreadyExistsError       ALREADY_EXISTS
    ├── FailedPreconditionError  FAILED_PRECONDITION
    ├── ResourceExhaustedError   RESOURCE_EXHAUSTED
    ├── UnauthenticatedError     UNAUTHENTICATED
    ├── PermissionDeniedError    PERMISSION_DENIED
    ├── UnavailableError         UNAVAILABLE
    ├── DataLossError            DATA_LOSS
    ├── DeadlineExceededError    DEADLINE_EXCEEDED
    └── IntegrityError           DATA_LOSS, raised by the client itself when a downloaded
                                 array's sha256 differs from the one in its header

:func:`from_rpc_error` turns a ``grpc.RpcError`` into the matching class. The client also raises
``InvalidArgumentError`` for input it rejects before calling a service, and ``DataLossError`` when
a download stream breaks the array protocol (a chunk before its header, too few or too many bytes).
"""

import grpc

__all__ = [
    "AlreadyExistsError",
    "DataLossError",
    "DeadlineExceededError",
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
]


class EngineError(Exception):
    """A failed call to a LasagneEngine service.

    Parameters
    ----------
    details : str
        What went wrong, usually the server's status message. ``str()`` of the error returns it.
    code : grpc.StatusCode, optional
        The gRPC status of the failure. Default: the class's own code (``UNKNOWN`` for this class).

    Attributes
    ----------
    code : grpc.StatusCode
        The gRPC status of the failure.
    details : str
        What went wrong.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, *, code: grpc.StatusCode | None = None):
        super().__init__(details)
        self.details = details
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.details


class InvalidArgumentError(EngineError):
    """An invalid name, reference, value or array in the request."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(EngineError):
    """A missing model, dataset, array, parameter set or session."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(EngineError):
    """An object that the request would create, which exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(EngineError):
    """A request that the object's state does not allow, for example stopping a session that has ended."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(EngineError):
    """A limit reached: message size, storage, or the number of sessions running at once."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnauthenticatedError(EngineError):
    """A call without a token, or with one the service does not accept. Check LASAGNE_ENGINE_TOKEN."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(EngineError):
    """A call that the token may not make, for example a write with a read-only token."""

    code = grpc.StatusCode.PERMISSION_DENIED


class UnavailableError(EngineError):
    """A service that cannot be reached or is shutting down. Retrying the call may succeed."""

    code = grpc.StatusCode.UNAVAILABLE


class DataLossError(EngineError):
    """Stored or streamed bytes that are damaged or incomplete."""

    code = grpc.StatusCode.DATA_LOSS


class DeadlineExceededError(EngineError):
    """A call that did not finish within its timeout."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class IntegrityError(EngineError):
    """A downloaded array whose sha256, computed by the client, differs from the one in its header.

    Parameters
    ----------
    array : str
        Name of the array.
    expected_sha256 : str
        Hex digest the server's header recorded.
    actual_sha256 : str
        Hex digest of the bytes the client assembled.
    source : str, optional
        What the array belongs to, for example ``"dataset 'digits@2'"``. Default: empty.
    """

    code = grpc.StatusCode.DATA_LOSS

    def __init__(self, array: str, expected_sha256: str, actual_sha256: str, *, source: str = ""):
        where = f" of {source}" if source else ""
        super().__init__(
            f"Downloaded array {array!r}{where} has sha256 {actual_sha256}, but its header recorded "
            f"{expected_sha256}. Download it again; if the digests still differ, the stored copy is damaged."
        )
        self.array = array
        self.expected_sha256 = expected_sha256
        self.actual_sha256 = actual_sha256


_ERROR_CLASSES: dict[grpc.StatusCode, type[EngineError]] = {
    error_class.code: error_class
    for error_class in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        ResourceExhaustedError,
        UnauthenticatedError,
        PermissionDeniedError,
        UnavailableError,
        DataLossError,
        DeadlineExceededError,
    )
}


def from_rpc_error(error: grpc.RpcError) -> EngineError:
    """Convert a failed gRPC call into the client exception for its status code.

    Parameters
    ----------
    error : grpc.RpcError
        The error raised by a stub call. Errors that carry no status (plain ``grpc.RpcError``
        instances) become ``EngineError`` with code ``UNKNOWN``.

    Returns
    -------
    EngineError
        An instance of the subclass for the status code, or of ``EngineError`` itself for codes
        without a subclass. Its ``details`` are the server's message, or a sentence naming the
        code when the server sent none.
    """
    code_method = getattr(error, "code", None)
    code = code_method() if callable(code_method) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN

    details_method = getattr(error, "details", None)
    details = details_method() if callable(details_method) else str(error)
    if not details:
        details = f"The call failed with status {code.name} and no details."

    error_class = _ERROR_CLASSES.get(code, EngineError)
    return error_class(details, code=code)
