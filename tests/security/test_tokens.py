"""Bearer tokens: every method of every service, called without a token, with a read-only and with a read-write token."""

import logging

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lasagne_engine.client import Engine, PermissionDeniedError, UnauthenticatedError
from lasagne_engine.interceptors import SESSION_TOKEN_METHODS, is_read_only
from lasagne_engine.security import ClientSecurity
from lasagne_engine.v1 import data_service_pb2, model_registry_pb2, trainer_pb2

from .conftest import READ_ONLY_TOKEN, READ_WRITE_TOKEN

SERVICES = {
    "registry": model_registry_pb2.DESCRIPTOR.services_by_name["ModelRegistry"],
    "data": data_service_pb2.DESCRIPTOR.services_by_name["DataService"],
    "trainer": trainer_pb2.DESCRIPTOR.services_by_name["Trainer"],
}
METHODS = [
    (role, f"/{service.full_name}/{method.name}", method)
    for role, service in SERVICES.items()
    for method in service.methods
]
DENIED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


def call_with_empty_request(channel: grpc.Channel, path: str, method) -> tuple[grpc.StatusCode, str]:
    """Call ``path`` with an empty request message (or an empty request stream) and return the status."""
    # A watch that passed the token check waits for events until its deadline.
    timeout_s = 1 if method.name.startswith("Watch") else 5
    try:
        if method.client_streaming and method.server_streaming:
            call = channel.stream_stream(path)(iter([]), timeout=timeout_s)
            next(iter(call), None)
            call.cancel()
        elif method.client_streaming:
            channel.stream_unary(path)(iter([]), timeout=timeout_s)
        elif method.server_streaming:
            call = channel.unary_stream(path)(b"", timeout=timeout_s)
            next(iter(call), None)
            call.cancel()
        else:
            channel.unary_unary(path)(b"", timeout=timeout_s)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.fixture(scope="module")
def channels(secure_stack):
    opened = {}

    def channel(role: str, token: str) -> grpc.Channel:
        key = (role, token)
        if key not in opened:
            opened[key] = secure_stack.channel(role, secure_stack.client_security(token=token))
        return opened[key]

    yield channel
    for channel_ in opened.values():
        channel_.close()


@pytest.mark.parametrize(("role", "path", "method"), METHODS, ids=[path for _, path, _ in METHODS])
class TestEveryMethod:
    def test_without_token(self, channels, role, path, method):
        code, details = call_with_empty_request(channels(role, ""), path, method)

        if path in SESSION_TOKEN_METHODS:
            # The trainer checks the session's own token in the first message instead.
            assert code not in DENIED or "session" in details, details
        else:
            assert code == grpc.StatusCode.UNAUTHENTICATED, details
            assert "carries no bearer token" in details
            assert "LASAGNE_ENGINE_TOKEN" in details

    def test_with_unknown_token(self, channels, role, path, method):
        code, details = call_with_empty_request(channels(role, "unknown-token-" + "x" * 20), path, method)

        if path not in SESSION_TOKEN_METHODS:
            assert code == grpc.StatusCode.UNAUTHENTICATED, details
            assert "is not one this server accepts" in details
            assert "unknown-token" not in details

    def test_with_read_only_token(self, channels, role, path, method):
        code, details = call_with_empty_request(channels(role, READ_ONLY_TOKEN), path, method)

        if is_read_only(path) or path in SESSION_TOKEN_METHODS:
            assert code not in DENIED, details
        else:
            assert code == grpc.StatusCode.PERMISSION_DENIED, details
            assert "is read-only" in details
            assert method.name in details
            assert READ_ONLY_TOKEN not in details

    def test_with_read_write_token(self, channels, role, path, method):
        code, details = call_with_empty_request(channels(role, READ_WRITE_TOKEN), path, method)

        assert code not in DENIED, details


def test_read_only_methods_are_the_documented_ones():
    read_only = sorted(method.name for _, path, method in METHODS if is_read_only(path))

    assert all(name.startswith(("List", "Get", "Describe", "Download", "Load", "Watch")) for name in read_only)
    assert "SaveParameterSet" not in read_only
    assert "RegisterModel" not in read_only
    assert "ListModels" in read_only
    assert "LoadParameterSet" in read_only


@pytest.mark.parametrize("role", ["registry", "data", "trainer"])
def test_health_needs_no_token(secure_stack, role):
    security = ClientSecurity(tls_ca=secure_stack.tls.ca_cert)
    with secure_stack.channel(role, security) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)

    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_engine_round_trip_with_tokens(secure_stack):
    arrays = {"x": np.arange(12, dtype=np.float32).reshape(3, 4)}
    writer = Engine(**secure_stack.addresses(), token=READ_WRITE_TOKEN, tls_ca=secure_stack.tls.ca_cert)
    reader = Engine(**secure_stack.addresses(), token=READ_ONLY_TOKEN, tls_ca=secure_stack.tls.ca_cert)

    with writer, reader:
        version = writer.upload_dataset("tokens", arrays)
        loaded = reader.load_dataset(f"tokens@{version.version}")
        with pytest.raises(PermissionDeniedError, match="is read-only, and DataService/DeleteDataset changes data"):
            reader.delete_dataset("tokens")

    np.testing.assert_array_equal(loaded["x"], arrays["x"])


def test_engine_without_token_raises_unauthenticated(secure_stack):
    with Engine(**secure_stack.addresses(), token="", tls_ca=secure_stack.tls.ca_cert) as engine:
        with pytest.raises(UnauthenticatedError, match="carries no bearer token") as raised:
            engine.list_models()

    assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_rejections_never_log_the_token(secure_stack, caplog):
    wrong = "wrong-token-" + "z" * 24
    with caplog.at_level(logging.DEBUG):
        for token in (wrong, READ_ONLY_TOKEN):
            with Engine(**secure_stack.addresses(), token=token, tls_ca=secure_stack.tls.ca_cert, max_retries=0) as engine:
                with pytest.raises((UnauthenticatedError, PermissionDeniedError)):
                    engine.delete_dataset("anything")

    # The read-only rejection of DeleteDataset was logged once already, by the tests above.
    text = caplog.text
    assert "Rejected a call with UNAUTHENTICATED" in text
    assert wrong not in text
    assert READ_ONLY_TOKEN not in text
    assert READ_WRITE_TOKEN not in text


def test_attach_worker_checks_the_session_token(secure_stack):
    security = ClientSecurity(tls_ca=secure_stack.tls.ca_cert)
    hello = trainer_pb2.WorkerReport(
        hello=trainer_pb2.WorkerHello(session_id="s-000000000000", token="guessed-" + "0" * 24, pid=1)
    )
    with secure_stack.channel("trainer", security) as channel:
        call = channel.stream_stream(
            "/lasagne_engine.v1.Trainer/AttachWorker",
            request_serializer=trainer_pb2.WorkerReport.SerializeToString,
            response_deserializer=trainer_pb2.WorkerCommand.FromString,
        )(iter([hello]), timeout=5)
        with pytest.raises(grpc.RpcError) as raised:
            next(iter(call))

    # No user token passed the interceptor; the trainer's own check of the session rejected the call.
    assert raised.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED)
    assert "s-000000000000" in raised.value.details()
