"""Server interceptors that every LasagneEngine server installs, outermost first.

- :class:`TokenInterceptor` checks the bearer token of each call: UNAUTHENTICATED without a
  valid token, PERMISSION_DENIED for a read-only token on a method that writes.
- :class:`StreamLimitInterceptor` rejects a client's streaming call beyond its limit of open
  streams with RESOURCE_EXHAUSTED.
- :class:`RequestDecodingInterceptor` rejects bytes that do not parse as the method's request
  message with INVALID_ARGUMENT, where gRPC would return INTERNAL.

The health service is open to every caller. ``Trainer.AttachWorker`` takes no user token either:
session processes call it, and the trainer checks the secret per-session token in its first message.
"""

import collections
import hashlib
import hmac
import logging
import threading
from collections.abc import Callable, Iterable, Iterator

import grpc

from lasagne_engine.security import token_fingerprint

__all__ = [
    "OPEN_SERVICES",
    "READ_ONLY_PREFIXES",
    "RequestDecodingInterceptor",
    "SESSION_TOKEN_METHODS",
    "StreamLimitInterceptor",
    "TokenInterceptor",
    "is_read_only",
]

logger = logging.getLogger(__name__)

AUTHORIZATION_KEY = "authorization"
BEARER_PREFIX = "Bearer "
# Method names with these prefixes only read, so a read-only token may call them.
READ_ONLY_PREFIXES = ("List", "Get", "Describe", "Download", "Load", "Watch")
OPEN_SERVICES = ("grpc.health.v1.Health",)
# Authenticated by the per-session token in the first request message, checked by the trainer.
SESSION_TOKEN_METHODS = frozenset({"/lasagne_engine.v1.Trainer/AttachWorker"})
TOKEN_FIX = (
    "set LASAGNE_ENGINE_TOKEN, or token in the [client] section of the config file, "
    "to a token listed in the server's configuration"
)


def is_read_only(method: str) -> bool:
    """Return whether the full method name (``/package.Service/Method``) names a method that only reads."""
    return method.rsplit("/", 1)[-1].startswith(READ_ONLY_PREFIXES)


def _service_of(method: str) -> str:
    return method.lstrip("/").split("/", 1)[0]


def _short_name(method: str) -> str:
    # "/lasagne_engine.v1.ModelRegistry/ListModels" becomes "ModelRegistry/ListModels".
    service, _, name = method.lstrip("/").partition("/")
    return f"{service.rsplit('.', 1)[-1]}/{name}"


def _handler_factory(handler: grpc.RpcMethodHandler) -> tuple[Callable, Callable]:
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler, handler.stream_stream
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler, handler.stream_unary
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler, handler.unary_stream
    return grpc.unary_unary_rpc_method_handler, handler.unary_unary


def _replace_behavior(
    handler: grpc.RpcMethodHandler, behavior: Callable, *, request_deserializer: Callable | None
) -> grpc.RpcMethodHandler:
    factory, _ = _handler_factory(handler)
    return factory(
        behavior, request_deserializer=request_deserializer, response_serializer=handler.response_serializer
    )


def _rejecting_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    def reject(_request, context):
        context.abort(code, message)

    if handler.response_streaming:

        def reject_stream(_request, context):
            context.abort(code, message)
            yield  # pragma: no cover - makes this a generator, as a streaming handler must be

        return _replace_behavior(handler, reject_stream, request_deserializer=handler.request_deserializer)
    return _replace_behavior(handler, reject, request_deserializer=handler.request_deserializer)


class _RepeatCounter:
    """Counts repeated events by key and picks the ones to log: the 1st, 10th, 100th and so on."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: collections.Counter = collections.Counter()

    def should_log(self, key: str) -> tuple[bool, int]:
        with self._lock:
            self._counts[key] += 1
            count = self._counts[key]
        return count == 1 or str(count).rstrip("0") == "1", count


class TokenInterceptor(grpc.ServerInterceptor):
    """Accepts a call only with a bearer token that the server lists and that allows the method.

    Parameters
    ----------
    read_only_tokens, read_write_tokens : iterable of str
        Accepted tokens. Only their sha256 digests are kept.
    """

    def __init__(self, *, read_only_tokens: Iterable[str], read_write_tokens: Iterable[str]):
        self._digests: list[tuple[bytes, bool]] = [
            (hashlib.sha256(token.encode("utf-8")).digest(), False) for token in read_only_tokens
        ] + [(hashlib.sha256(token.encode("utf-8")).digest(), True) for token in read_write_tokens]
        self._rejections = _RepeatCounter()

    def _lookup(self, token: str) -> bool | None:
        """Return whether ``token`` may write, or None when it is not listed."""
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        allowed: bool | None = None
        # Every digest is compared, so the time taken does not reveal which one matched.
        for known, may_write in self._digests:
            if hmac.compare_digest(known, digest):
                allowed = may_write
        return allowed

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or _service_of(method) in OPEN_SERVICES or method in SESSION_TOKEN_METHODS:
            return handler

        token = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == AUTHORIZATION_KEY and isinstance(value, str) and value.startswith(BEARER_PREFIX):
                token = value[len(BEARER_PREFIX) :].strip()
                break
        name = _short_name(method)

        if not token:
            return self._reject(
                handler, grpc.StatusCode.UNAUTHENTICATED, f"The call to {name} carries no bearer token; {TOKEN_FIX}.",
                key=f"{name} without a token",
            )
        may_write = self._lookup(token)
        fingerprint = token_fingerprint(token)
        if may_write is None:
            return self._reject(
                handler,
                grpc.StatusCode.UNAUTHENTICATED,
                f"The bearer token of the call to {name} (fingerprint {fingerprint}) is not one this server accepts; "
                f"{TOKEN_FIX}.",
                key=f"{name} with unknown token {fingerprint}",
            )
        if not may_write and not is_read_only(method):
            return self._reject(
                handler,
                grpc.StatusCode.PERMISSION_DENIED,
                f"The token {fingerprint} is read-only, and {name} changes data; call it with a read-write token. "
                f"Read-only tokens may call methods whose names start with {', '.join(READ_ONLY_PREFIXES)}.",
                key=f"{name} with read-only token {fingerprint}",
            )
        return handler

    def _reject(self, handler, code: grpc.StatusCode, message: str, *, key: str) -> grpc.RpcMethodHandler:
        should_log, count = self._rejections.should_log(key)
        if should_log:
            logger.warning("Rejected a call with %s (%d so far): %s", code.name, count, message)
        return _rejecting_handler(handler, code, message)


class StreamLimitInterceptor(grpc.ServerInterceptor):
    """Limits the streaming calls that one client connection has open at once.

    A client is one connection, as ``context.peer()`` names it: each ``Engine`` opens its own.

    Parameters
    ----------
    max_streams_per_client : int
        Open streaming calls allowed per connection; the next one fails with RESOURCE_EXHAUSTED.
    """

    def __init__(self, max_streams_per_client: int):
        self.max_streams_per_client = max_streams_per_client
        self._lock = threading.Lock()
        self._open: collections.Counter = collections.Counter()
        self._rejections = _RepeatCounter()

    def open_streams(self, peer: str | None = None) -> int:
        """Return how many streaming calls ``peer`` has open, or all clients together when it is None."""
        with self._lock:
            return self._open[peer] if peer is not None else sum(self._open.values())

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not (handler.request_streaming or handler.response_streaming):
            return handler
        _, behavior = _handler_factory(handler)
        name = _short_name(handler_call_details.method)

        def admit(context) -> None:
            peer = context.peer()
            with self._lock:
                admitted = self._open[peer] < self.max_streams_per_client
                if admitted:
                    self._open[peer] += 1
            if not admitted:
                message = (
                    f"Client {peer} already has {self.max_streams_per_client} streams open on this server, "
                    f"the maximum per client, so {name} was rejected; wait for a stream to end, or raise "
                    "LASAGNE_ENGINE_MAX_STREAMS_PER_CLIENT on the server."
                )
                should_log, count = self._rejections.should_log(peer)
                if should_log:
                    logger.warning("Rejected a stream with RESOURCE_EXHAUSTED (%d so far): %s", count, message)
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
            # The callback runs when the call ends for any reason, including a cancellation.
            if not context.add_callback(lambda: self._release(peer)):
                self._release(peer)

        if handler.response_streaming:

            def limited_stream(request, context):
                admit(context)
                yield from behavior(request, context)

            return _replace_behavior(handler, limited_stream, request_deserializer=handler.request_deserializer)

        def limited(request, context):
            admit(context)
            return behavior(request, context)

        return _replace_behavior(handler, limited, request_deserializer=handler.request_deserializer)

    def _release(self, peer: str) -> None:
        with self._lock:
            self._open[peer] -= 1
            if self._open[peer] <= 0:
                del self._open[peer]


class RequestDecodingInterceptor(grpc.ServerInterceptor):
    """Parses request messages itself, so that bytes which are not a valid message get INVALID_ARGUMENT."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        decode = handler.request_deserializer
        _, behavior = _handler_factory(handler)
        name = _short_name(handler_call_details.method)

        def parse(raw: bytes, context):
            try:
                return decode(raw)
            except Exception as error:  # noqa: BLE001 - any parse failure is the caller's bad request
                message = (
                    f"The request to {name} is not a valid protobuf message for this method "
                    f"({type(error).__name__}: {error}); {len(raw)} bytes arrived. "
                    "Build requests with the lasagne_engine.v1 stubs."
                )
                logger.info("Rejected a request with INVALID_ARGUMENT: %s", message)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

        def parse_stream(raw_requests: Iterator[bytes], context) -> Iterator:
            for raw in raw_requests:
                yield parse(raw, context)

        if handler.request_streaming and handler.response_streaming:

            def decoded(requests, context):
                yield from behavior(parse_stream(requests, context), context)

        elif handler.request_streaming:

            def decoded(requests, context):
                return behavior(parse_stream(requests, context), context)

        elif handler.response_streaming:

            def decoded(raw, context):
                yield from behavior(parse(raw, context), context)

        else:

            def decoded(raw, context):
                return behavior(parse(raw, context), context)

        return _replace_behavior(handler, decoded, request_deserializer=None)
