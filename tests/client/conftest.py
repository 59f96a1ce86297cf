"""Small in-test gRPC servers that stand in for the services in the client's tests."""

from concurrent import futures

import grpc
import pytest

from lasagne_engine.client import Engine
from lasagne_engine.client.retries import RetryPolicy
from lasagne_engine.config import StreamLimits

# Small enough that every test array spans several chunks.
CHUNK_BYTES = 64


@pytest.fixture
def serve():
    """Return a function that starts a server on 127.0.0.1:0 with the given servicers and returns its address.

    Each argument is a pair ``(add_XServicer_to_server, servicer)``. The servers stop when the
    test ends, cancelling calls still in flight.
    """
    servers = []

    def start(*registrations) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        for add_to_server, servicer in registrations:
            add_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(grace=None).wait()


@pytest.fixture
def connect():
    """Return a function that opens an Engine whose three services are all at one address."""
    engines = []

    def open_engine(address: str, *, timeout_s: float = 10.0) -> Engine:
        engine = Engine(
            registry_address=address,
            data_address=address,
            trainer_address=address,
            timeout_s=timeout_s,
            limits=StreamLimits(chunk_bytes=CHUNK_BYTES),
        )
        engines.append(engine)
        return engine

    yield open_engine
    for engine in engines:
        engine.close()


@pytest.fixture(autouse=True)
def no_retry_backoff(monkeypatch):
    """Retry calls and resume downloads at once, keeping the number of retries."""
    monkeypatch.setattr(RetryPolicy, "backoffs_s", lambda policy: iter([0.0] * policy.max_retries))
