"""Servers with TLS and tokens on 127.0.0.1, development certificates, and the hypothesis profiles."""

import dataclasses
import os
import pathlib

import grpc
import pytest
from hypothesis import HealthCheck, settings

from lasagne_engine import rpc
from lasagne_engine.certificates import DevelopmentTls, create_development_tls
from lasagne_engine.config import StreamLimits
from lasagne_engine.data_service import add_data_service
from lasagne_engine.model_registry import add_model_registry
from lasagne_engine.security import ClientSecurity, ServerSecurity
from lasagne_engine.trainer import add_trainer
from lasagne_engine.trainer.devices import cpu_devices

# The CI profile keeps the property-based tests of this folder to about a minute on 2 cores.
# "thorough" runs four times as many examples, for a run by hand before a release.
settings.register_profile(
    "ci",
    max_examples=100,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "thorough",
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

READ_WRITE_TOKEN = "rw-" + "a1b2c3d4" * 4
READ_ONLY_TOKEN = "ro-" + "e5f6a7b8" * 4


@pytest.fixture(scope="session")
def development_tls(tmp_path_factory) -> DevelopmentTls:
    return create_development_tls(tmp_path_factory.mktemp("tls"))


@dataclasses.dataclass
class SecureStack:
    """The three services with TLS and tokens, each on its own loopback port."""

    registry: rpc.Server
    data: rpc.Server
    trainer: rpc.Server
    trainer_servicer: object
    tls: DevelopmentTls
    home: pathlib.Path

    def addresses(self) -> dict[str, str]:
        return {
            "registry_address": self.registry.address,
            "data_address": self.data.address,
            "trainer_address": self.trainer.address,
        }

    def client_security(self, token: str = READ_WRITE_TOKEN, **overrides) -> ClientSecurity:
        fields = {"token": token, "tls_ca": self.tls.ca_cert, **overrides}
        return ClientSecurity(**fields)

    def channel(self, role: str, security: ClientSecurity) -> grpc.Channel:
        return rpc.client_channel(getattr(self, role).address, StreamLimits(), security=security)

    def stop(self) -> None:
        self.trainer_servicer.manager.close()
        for server in (self.trainer, self.data, self.registry):
            server.stop(grace_s=1.0)


def start_secure_stack(
    home: pathlib.Path, tls: DevelopmentTls, compile_cache: pathlib.Path, *, require_client_certificates=False
) -> SecureStack:
    security = ServerSecurity(
        tls_cert=tls.server_cert,
        tls_key=tls.server_key,
        tls_client_ca=tls.ca_cert if require_client_certificates else None,
        read_only_tokens=(READ_ONLY_TOKEN,),
        read_write_tokens=(READ_WRITE_TOKEN,),
    )
    registry = rpc.Server("127.0.0.1:0", security=security, limits=StreamLimits())
    add_model_registry(registry, root=home / "registry", compile_cache=compile_cache)
    data = rpc.Server("127.0.0.1:0", security=security, limits=StreamLimits())
    add_data_service(data, root=home / "data")
    trainer = rpc.Server("127.0.0.1:0", security=security, limits=StreamLimits())
    trainer_servicer = add_trainer(
        trainer,
        root=home / "trainer",
        registry_address=registry.address,
        data_address=data.address,
        compile_cache=compile_cache,
        devices=cpu_devices(1, memory_budget_bytes=4 << 30),
        backend="default",
    )
    for server in (registry, data, trainer):
        server.start()
    return SecureStack(registry, data, trainer, trainer_servicer, tls, home)


@pytest.fixture(scope="module")
def secure_stack(tmp_path_factory, development_tls, compile_cache, monkeypatch_module) -> SecureStack:
    """Services that require TLS and a token. The trainer's own client uses the read-write token."""
    monkeypatch_module.setenv("LASAGNE_ENGINE_TOKEN", READ_WRITE_TOKEN)
    monkeypatch_module.setenv("LASAGNE_ENGINE_TLS_CA", str(development_tls.ca_cert))
    stack = start_secure_stack(tmp_path_factory.mktemp("secure"), development_tls, compile_cache)
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="package")
def registry_template(tmp_path_factory, compile_cache) -> pathlib.Path:
    """A registry root with model 'digits' version 1, registered once for every test of this folder."""
    from .services import register_template

    return register_template(tmp_path_factory.mktemp("template") / "registry", compile_cache)
