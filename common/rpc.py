"""gRPC plumbing shared by every server and client: options, health service, channels."""

import logging
import os
from collections.abc import Iterable
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from lasagne_engine.config import StreamLimits

logger = logging.getLogger(__name__)

DEFAULT_MAX_WORKERS = 32


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


class Server:
    """A gRPC server with the health service, bound to one address.

    Parameters
    ----------
    address : str
        ``host:port`` to listen on; port 0 picks a free port, read back from :attr:`port`.
    limits : StreamLimits
        Message size limits. Default from the environment.
    max_workers : int
        Threads serving calls; long streams each hold one. Default 32.
    """

    def __init__(self, address: str, *, limits: StreamLimits | None = None, max_workers: int = DEFAULT_MAX_WORKERS):
        self.limits = limits or StreamLimits.from_env()
        self.grpc_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
            options=server_options(self.limits),
        )
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        self.port = self.grpc_server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"Could not bind {address!r}; is another process listening there?")
        host = address.rsplit(":", 1)[0]
        self.address = f"{host}:{self.port}"
        self._service_names: list[str] = []

    def add_service_name(self, name: str) -> None:
        """Report ``name`` in the health service once the server starts."""
        self._service_names.append(name)

    def start(self) -> "Server":
        self.grpc_server.start()
        for name in ["", *self._service_names]:
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        logger.info("Serving %s on %s", ", ".join(self._service_names) or "health", self.address)
        return self

    def stop(self, grace_s: float | None = 5.0) -> None:
        """Stop accepting calls and wait up to ``grace_s`` seconds for calls in flight."""
        self.health.enter_graceful_shutdown()
        self.grpc_server.stop(grace_s).wait()
        logger.info("Stopped the server on %s", self.address)

    def wait(self) -> None:
        self.grpc_server.wait_for_termination()


def insecure_channel(address: str, limits: StreamLimits | None = None) -> grpc.Channel:
    """Open a channel to ``address`` with the engine's message limits."""
    return grpc.insecure_channel(address, options=channel_options(limits or StreamLimits.from_env()))


def is_serving(address: str, *, timeout_s: float = 1.0, service: str = "") -> bool:
    """Return whether the health service at ``address`` reports SERVING for ``service``."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def configure_logging(level: str | None = None, *, extra_handlers: Iterable[logging.Handler] = ()) -> None:
    """Send log records to standard error with timestamps; level from ``LASAGNE_ENGINE_LOG_LEVEL``."""
    level_name = (level or os.environ.get("LASAGNE_ENGINE_LOG_LEVEL", "INFO")).upper()
    logging.basicConfig(
        level=level_name,
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
    )
    for handler in extra_handlers:
        logging.getLogger().addHandler(handler)
