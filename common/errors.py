"""Domain errors shared by the services, each carrying the gRPC status it becomes.

::

    EngineError
    ├── InvalidArgument      INVALID_ARGUMENT
    ├── NotFound             NOT_FOUND
    ├── AlreadyExists        ALREADY_EXISTS
    ├── FailedPrecondition   FAILED_PRECONDITION
    ├── ResourceExhausted    RESOURCE_EXHAUSTED
    ├── PermissionDenied     PERMISSION_DENIED
    ├── Unauthenticated      UNAUTHENTICATED
    ├── Unavailable          UNAVAILABLE
    └── IntegrityError       DATA_LOSS

Domain code raises these and imports nothing from gRPC. :func:`grpc_errors` at the servicer edge turns
each into ``context.abort(code, message)``; any other exception becomes INTERNAL and is logged.
"""

import functools
import inspect
import logging

import grpc

logger = logging.getLogger(__name__)


class EngineError(Exception):
    """Base class of the errors a service reports to its caller."""

    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(EngineError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(EngineError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(EngineError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(EngineError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(EngineError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PermissionDenied(EngineError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(EngineError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Unavailable(EngineError):
    code = grpc.StatusCode.UNAVAILABLE


class IntegrityError(EngineError):
    """Bytes whose sha256 differs from the digest recorded for them."""

    code = grpc.StatusCode.DATA_LOSS


# A status message travels in a response header, and clients drop responses whose headers exceed
# 16 KiB (gRPC's default), so a message that quotes a huge request is cut short.
MAX_MESSAGE_CHARACTERS = 4096


def _clip(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARACTERS:
        return message
    return f"{message[:MAX_MESSAGE_CHARACTERS]}... ({len(message) - MAX_MESSAGE_CHARACTERS} more characters)"


def _abort(context: grpc.ServicerContext, method_name: str, error: Exception) -> None:
    if isinstance(error, EngineError):
        message = _clip(str(error))
        logger.info("%s rejected with %s: %s", method_name, error.code.name, message)
        context.abort(error.code, message)
    logger.exception("%s failed with an unexpected error", method_name)
    context.abort(grpc.StatusCode.INTERNAL, _clip(f"{method_name} failed: {type(error).__name__}: {error}"))


def grpc_errors(method):
    """Decorate a servicer method so that domain errors become gRPC status codes.

    Works for unary and server-streaming methods; for a generator the errors raised while
    streaming are translated as well.
    """
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def streaming(self, request, context):
            try:
                yield from method(self, request, context)
            except Exception as error:  # noqa: BLE001 - translated to a status at the edge
                if _is_abort(error):
                    raise
                _abort(context, method.__name__, error)

        return streaming

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except Exception as error:  # noqa: BLE001 - translated to a status at the edge
            if _is_abort(error):
                raise
            _abort(context, method.__name__, error)

    return unary


def _is_abort(error: Exception) -> bool:
    # context.abort() records the status, then raises a bare Exception() (grpcio 1.85). That
    # exception must propagate unchanged, because catching it would replace the status with INTERNAL.
    return type(error) is Exception and not error.args
