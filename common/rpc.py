"""gRPC plumbing shared by every server and client: options, security, health service, channels."""

import ipaddress
import logging
import os
import threading
import time
from collections.abc import Iterable
from concurrent import futures
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from lasagne_engine.config import StreamLimits
from lasagne_engine.interceptors import RequestDecodingInterceptor, StreamLimitInterceptor, TokenInterceptor
from lasagne_engine.security import ClientSecurity, ServerSecurity

logger = logging.getLogger(__name__)

DEFAULT_MAX_WORKERS = 32
# A client whose server went away retries the connection after 0.25 s, growing to at most 4 s,
# so that a restarted service is found within seconds rather than gRPC's default of up to 120 s.
CLIENT_RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 4_000),
]


def channel_options(limits: StreamLimits) -> list[tuple[str, int]]:
    """Message size limits and keepalive settings used on both ends of every connection."""
    return [
        ("grpc.max_send_message_length", limits.max_message_bytes),
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options(limits: StreamLimits) -> list[tuple[str, int]]:
    return [
        *channel_options(limits),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        # Refuse a second server on the same port instead of silently sharing it.
        ("grpc.so_reuseport", 0),
    ]


def is_loopback(host: str) -> bool:
    """Return whether ``host`` (a name or an IP address, IPv6 with or without brackets) is this machine only."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# Seconds a stopping server waits for each background task to end before it stops waiting.
BACKGROUND_TASK_JOIN_S = 30.0


class BackgroundTask(Protocol):
    """Work that runs in its own thread while a server serves, such as a periodic cleanup."""

    def start(self) -> None: ...

    def request_stop(self) -> None: ...

    def join(self, timeout_s: float | None = None) -> bool: ...


class Server:
    """A gRPC server with the health service, bound to one address.

    Every server installs the interceptors of :mod:`lasagne_engine.interceptors`: bearer tokens
    when ``security`` lists any, the per-client stream limit, and INVALID_ARGUMENT for requests
    that do not parse.

    Parameters
    ----------
    address : str
        ``host:port`` to listen on; port 0 picks a free port, read back from :attr:`port`.
    limits : StreamLimits
        Message size and stream limits. Default from the environment.
    max_workers : int
        Threads serving calls; long streams each hold one. Default 32.
    security : ServerSecurity, optional
        TLS files and accepted tokens. Default: plaintext, and calls need no token.

    Raises
    ------
    PermissionError
        If ``address`` is not a loopback address while the server has no TLS or does not
        authenticate its clients, unless ``security.allow_insecure_bind`` is set.
    OSError
        If the address cannot be bound.
    """

    def __init__(
        self,
        address: str,
        *,
        limits: StreamLimits | None = None,
        max_workers: int = DEFAULT_MAX_WORKERS,
        security: ServerSecurity | None = None,
    ):
        self.limits = limits or StreamLimits.from_env()
        self.security = security or ServerSecurity()
        host = address.rsplit(":", 1)[0]
        _check_bind(host, self.security)

        self.stream_limit = StreamLimitInterceptor(self.limits.max_streams_per_client)
        interceptors: list[grpc.ServerInterceptor] = [self.stream_limit, RequestDecodingInterceptor()]
        if self.security.requires_token:
            interceptors.insert(
                0,
                TokenInterceptor(
                    read_only_tokens=self.security.read_only_tokens,
                    read_write_tokens=self.security.read_write_tokens,
                ),
            )
        self.grpc_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
            options=server_options(self.limits),
            interceptors=interceptors,
        )
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)

        if self.security.tls:
            self.port = self.grpc_server.add_secure_port(address, _server_credentials(self.security))
        else:
            self.port = self.grpc_server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"Could not bind {address!r}; is another process listening there?")
        self.address = f"{host}:{self.port}"
        self._service_names: list[str] = []
        self._background_tasks: list[BackgroundTask] = []

    def add_service_name(self, name: str) -> None:
        """Report ``name`` in the health service once the server starts."""
        self._service_names.append(name)

    def add_background_task(self, task: BackgroundTask) -> None:
        """Start ``task`` when the server starts, and stop it when the server stops."""
        self._background_tasks.append(task)

    def start(self) -> "Server":
        self.grpc_server.start()
        for task in self._background_tasks:
            task.start()
        for name in ["", *self._service_names]:
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        logger.info(
            "Serving %s on %s (%s, %s)",
            ", ".join(self._service_names) or "health",
            self.address,
            "TLS" if self.security.tls else "plaintext",
            _describe_authentication(self.security),
        )
        return self

    def begin_stop(self, grace_s: float | None = 5.0) -> threading.Event:
        """Stop accepting calls, give calls in flight ``grace_s`` seconds, then cancel them.

        The health service reports NOT_SERVING from the start, and new calls fail with
        UNAVAILABLE. The background tasks are asked to stop at once. Returns an event that is set
        once every call has ended and every background task has ended, or has run
        ``BACKGROUND_TASK_JOIN_S`` seconds past the request to stop.
        """
        self.health.enter_graceful_shutdown()
        logger.info("Stopping the server on %s; calls in flight have %s s to finish", self.address, grace_s)
        for task in self._background_tasks:
            task.request_stop()
        calls_ended = self.grpc_server.stop(grace_s)
        if not self._background_tasks:
            return calls_ended

        stopped = threading.Event()

        def wait_for_calls_and_tasks() -> None:
            deadline = time.monotonic() + BACKGROUND_TASK_JOIN_S
            for task in self._background_tasks:
                if not task.join(max(0.0, deadline - time.monotonic())):
                    logger.warning(
                        "Background task %r of the server on %s did not stop within %g s; leaving it running",
                        task,
                        self.address,
                        BACKGROUND_TASK_JOIN_S,
                    )
            calls_ended.wait()
            stopped.set()

        threading.Thread(target=wait_for_calls_and_tasks, name="server-stop", daemon=True).start()
        return stopped

    def stop(self, grace_s: float | None = 5.0) -> None:
        """Stop as :meth:`begin_stop` does and wait until every call has ended."""
        self.begin_stop(grace_s).wait()
        logger.info("Stopped the server on %s", self.address)

    def wait(self) -> None:
        self.grpc_server.wait_for_termination()


def _check_bind(host: str, security: ServerSecurity) -> None:
    if is_loopback(host) or (security.tls and security.authenticates_clients):
        return
    missing = "TLS" if not security.tls else "client authentication (tokens or client certificates)"
    if not security.allow_insecure_bind:
        raise PermissionError(
            f"Refusing to listen on {host!r} without {missing}: anyone who reaches that address could read "
            "and change every model and dataset and run code on the trainer. Configure TLS and tokens "
            "(see 'lasagne-engine up --tls'), listen on 127.0.0.1, or set LASAGNE_ENGINE_ALLOW_INSECURE_BIND=1 "
            "on a network you trust."
        )
    logger.warning(
        "Listening on %s without %s because insecure binding is allowed; anyone who reaches this address "
        "can read and change all data and run code on the trainer",
        host,
        missing,
    )


def _describe_authentication(security: ServerSecurity) -> str:
    methods = []
    if security.requires_token:
        methods.append(
            f"{len(security.read_write_tokens)} read-write and {len(security.read_only_tokens)} read-only tokens"
        )
    if security.tls_client_ca is not None:
        methods.append("client certificates required")
    return ", ".join(methods) or "no authentication"


def _read(path) -> bytes:
    with open(path, "rb") as stream:
        return stream.read()


def _server_credentials(security: ServerSecurity) -> grpc.ServerCredentials:
    client_ca = _read(security.tls_client_ca) if security.tls_client_ca is not None else None
    return grpc.ssl_server_credentials(
        [(_read(security.tls_key), _read(security.tls_cert))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call of a channel, on TLS and plaintext channels alike."""

    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(
            method=details.method,
            timeout=details.timeout,
            metadata=[*(details.metadata or ()), self._header],
            credentials=details.credentials,
            wait_for_ready=details.wait_for_ready,
            compression=details.compression,
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._with_token(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._with_token(client_call_details), request_iterator)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, *, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


def client_channel(
    address: str, limits: StreamLimits | None = None, *, security: ClientSecurity | None = None
) -> grpc.Channel:
    """Open a channel to ``address`` over TLS when ``security`` gives a CA, sending its token with every call.

    Each channel gets its own connection, so that the server's per-client limits count each
    client separately even when several live in one process.
    """
    security = security or ClientSecurity()
    options = [
        *channel_options(limits or StreamLimits.from_env()),
        *CLIENT_RECONNECT_OPTIONS,
        ("grpc.use_local_subchannel_pool", 1),
    ]
    if security.tls:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(security.tls_ca),
            private_key=_read(security.tls_key) if security.tls_key is not None else None,
            certificate_chain=_read(security.tls_cert) if security.tls_cert is not None else None,
        )
        channel = grpc.secure_channel(address, credentials, options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    if security.token:
        channel = grpc.intercept_channel(channel, _BearerToken(security.token))
    return channel


def insecure_channel(address: str, limits: StreamLimits | None = None) -> grpc.Channel:
    """Open a plaintext channel to ``address`` with the engine's message limits and no token."""
    return grpc.insecure_channel(address, options=channel_options(limits or StreamLimits.from_env()))


def is_serving(
    address: str, *, timeout_s: float = 1.0, service: str = "", security: ClientSecurity | None = None
) -> bool:
    """Return whether the health service at ``address`` reports SERVING for ``service``.

    ``security`` gives the CA for a server with TLS; the health service needs no token.
    """
    with client_channel(address, StreamLimits(), security=security) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def configure_logging(level: str | None = None, *, extra_handlers: Iterable[logging.Handler] = ()) -> None:
    """Send log records to standard error with timestamps; level from ``LASAGNE_ENGINE_LOG_LEVEL``."""
    level_name = (level or os.environ.get("LASAGNE_ENGINE_LOG_LEVEL", "INFO")).upper()
    # force=True replaces the WARNING-level handler that the command line sets up before it runs
    # a service, which would otherwise drop every INFO line of the service.
    logging.basicConfig(
        level=level_name,
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
        force=True,
    )
    for handler in extra_handlers:
        logging.getLogger().addHandler(handler)
