"""TLS on the services, client certificates, binding rules and 'lasagne-engine up --tls'."""

import logging
import os
import stat
import subprocess
import sys
import tomllib

import grpc
import pytest

from lasagne_engine import rpc
from lasagne_engine.certificates import create_development_tls
from lasagne_engine.client import Engine, UnavailableError
from lasagne_engine.config import StreamLimits
from lasagne_engine.data_service import add_data_service
from lasagne_engine.security import ClientSecurity, ServerSecurity
from lasagne_engine.v1 import data_service_pb2, data_service_pb2_grpc
from tests.conftest import free_port

from .conftest import READ_WRITE_TOKEN, start_secure_stack


def list_datasets(address: str, security: ClientSecurity) -> None:
    with rpc.client_channel(address, StreamLimits(), security=security) as channel:
        data_service_pb2_grpc.DataServiceStub(channel).ListDatasets(data_service_pb2.ListDatasetsRequest(), timeout=5)


class TestServerTls:
    def test_plaintext_client_is_refused(self, secure_stack):
        with pytest.raises(grpc.RpcError) as raised:
            list_datasets(secure_stack.data.address, ClientSecurity(token=READ_WRITE_TOKEN))

        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE

    def test_client_with_another_ca_is_refused(self, secure_stack, tmp_path):
        other = create_development_tls(tmp_path / "other")

        with pytest.raises(grpc.RpcError) as raised:
            list_datasets(secure_stack.data.address, ClientSecurity(token=READ_WRITE_TOKEN, tls_ca=other.ca_cert))

        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE

    def test_client_with_the_ca_is_served(self, secure_stack):
        list_datasets(secure_stack.data.address, secure_stack.client_security())

    def test_engine_health_over_tls(self, secure_stack):
        with Engine(**secure_stack.addresses(), token=READ_WRITE_TOKEN, tls_ca=secure_stack.tls.ca_cert) as engine:
            assert engine.health() == {"registry": True, "data": True, "trainer": True}


@pytest.fixture(scope="module")
def mutual_stack(tmp_path_factory, development_tls, compile_cache):
    stack = start_secure_stack(
        tmp_path_factory.mktemp("mutual"), development_tls, compile_cache, require_client_certificates=True
    )
    yield stack
    stack.stop()


class TestClientCertificates:
    def test_without_client_certificate(self, mutual_stack):
        with pytest.raises(grpc.RpcError) as raised:
            list_datasets(mutual_stack.data.address, mutual_stack.client_security())

        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE

    def test_with_client_certificate(self, mutual_stack):
        tls = mutual_stack.tls
        list_datasets(
            mutual_stack.data.address, mutual_stack.client_security(tls_cert=tls.client_cert, tls_key=tls.client_key)
        )

    def test_server_certificate_is_not_a_client_certificate(self, mutual_stack):
        # The server's certificate is signed by the same CA but carries only the serverAuth usage.
        tls = mutual_stack.tls
        with pytest.raises(grpc.RpcError) as raised:
            list_datasets(
                mutual_stack.data.address, mutual_stack.client_security(tls_cert=tls.server_cert, tls_key=tls.server_key)
            )

        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


class TestBinding:
    def test_non_loopback_without_tls(self, tmp_path):
        with pytest.raises(PermissionError, match=r"Refusing to listen on '0.0.0.0' without TLS"):
            rpc.Server("0.0.0.0:0")

    def test_non_loopback_without_authentication(self, development_tls):
        security = ServerSecurity(tls_cert=development_tls.server_cert, tls_key=development_tls.server_key)

        with pytest.raises(PermissionError, match="without client authentication"):
            rpc.Server("[::]:0", security=security)

    @pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "127.0.0.2"])
    def test_loopback_needs_nothing(self, host):
        rpc._check_bind(host.strip("[]") if host == "[::1]" else host, ServerSecurity())

    def test_insecure_bind_allowed_with_warning(self, caplog):
        # Checked without binding, so that no test opens a port beyond loopback.
        with caplog.at_level(logging.WARNING, logger="lasagne_engine.rpc"):
            rpc._check_bind("0.0.0.0", ServerSecurity(allow_insecure_bind=True))

        assert "without TLS because insecure binding is allowed" in caplog.text

    def test_tls_and_tokens_allow_any_address(self, development_tls):
        security = ServerSecurity(
            tls_cert=development_tls.server_cert, tls_key=development_tls.server_key, read_write_tokens=(READ_WRITE_TOKEN,)
        )

        rpc._check_bind("0.0.0.0", security)

    def test_loopback_server_serves_without_security(self, tmp_path):
        server = rpc.Server("127.0.0.1:0", limits=StreamLimits())
        add_data_service(server, root=tmp_path)
        server.start()
        try:
            list_datasets(server.address, ClientSecurity())
        finally:
            server.stop(grace_s=None)


class TestUpWithTls:
    def test_up_tls_writes_private_config_and_serves(self, tmp_path):
        home = tmp_path / "home"
        environment = {
            **os.environ,
            "LASAGNE_ENGINE_HOME": str(home),
            "LASAGNE_ENGINE_REGISTRY_ADDRESS": f"127.0.0.1:{free_port()}",
            "LASAGNE_ENGINE_DATA_ADDRESS": f"127.0.0.1:{free_port()}",
            "LASAGNE_ENGINE_TRAINER_ADDRESS": f"127.0.0.1:{free_port()}",
        }
        for variable in ("LASAGNE_ENGINE_CONFIG", "LASAGNE_ENGINE_TOKEN", "LASAGNE_ENGINE_TLS_CA"):
            environment.pop(variable, None)
        command = [sys.executable, "-m", "lasagne_engine.client.cli"]

        def run(*arguments, env=environment):
            return subprocess.run([*command, *arguments], env=env, capture_output=True, text=True, timeout=120)

        try:
            started = run("up", "--tls")
            assert started.returncode == 0, started.stderr
            config_file = home / "config.toml"
            config = tomllib.loads(config_file.read_text())
            listed = run("datasets")
            plaintext = run("status", env={**environment, "LASAGNE_ENGINE_CONFIG": os.devnull})
            again = run("up", "--tls")
        finally:
            stopped = run("down")

        assert stat.S_IMODE(config_file.stat().st_mode) == 0o600
        assert stat.S_IMODE((home / "tls" / "server.key").stat().st_mode) == 0o600
        assert config["client"]["token"] == config["server"]["read_write_tokens"][0]
        assert len(config["server"]["read_only_tokens"]) == 1
        # Tokens stay in the file: neither the output nor the command line carries them.
        assert config["client"]["token"] not in started.stdout + started.stderr
        assert "serving" in started.stdout
        assert listed.returncode == 0, listed.stderr
        assert plaintext.returncode == 1
        assert "not answering" in plaintext.stdout
        assert again.returncode == 0, again.stderr
        assert tomllib.loads(config_file.read_text()) == config
        assert stopped.returncode == 0
