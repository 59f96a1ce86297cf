import dataclasses
import pathlib

import grpc
import pytest

from lasagne_engine.config import StreamLimits
from lasagne_engine.model_registry import create_server
from lasagne_engine.rpc import Server
from lasagne_engine.v1 import model_registry_pb2, model_registry_pb2_grpc

EXAMPLE_MODEL = pathlib.Path(__file__).parents[2] / "clients" / "examples" / "digits_mlp.py"


@dataclasses.dataclass
class RunningRegistry:
    """A started registry server, its root folder and a stub over a real channel to it."""

    server: Server
    root: pathlib.Path
    channel: grpc.Channel
    stub: model_registry_pb2_grpc.ModelRegistryStub
    stopped: bool = False

    def stop(self) -> None:
        if self.stopped:
            return
        self.channel.close()
        self.server.stop(grace_s=None)
        self.stopped = True


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory) -> pathlib.Path:
    """Compile cache folder that the definition checks of these tests share."""
    return tmp_path_factory.mktemp("compile-cache")


@pytest.fixture(scope="session")
def model_source() -> str:
    return EXAMPLE_MODEL.read_text()


@pytest.fixture
def start_registry(tmp_path, compile_cache):
    """Return a function that starts a registry server on 127.0.0.1 over a root folder.

    The root defaults to one folder per test, so a second call serves the first one's data.
    """
    running: list[RunningRegistry] = []

    def start(root: pathlib.Path | None = None) -> RunningRegistry:
        root = root if root is not None else tmp_path / "registry"
        server = create_server("127.0.0.1:0", root=root, compile_cache=compile_cache, limits=StreamLimits())
        server.start()
        channel = grpc.insecure_channel(server.address)
        registry = RunningRegistry(server, root, channel, model_registry_pb2_grpc.ModelRegistryStub(channel))
        running.append(registry)
        return registry

    yield start

    for registry in running:
        registry.stop()


@pytest.fixture
def registry(start_registry) -> RunningRegistry:
    return start_registry()


@pytest.fixture(scope="session")
def digits_registry_template(tmp_path_factory, compile_cache, model_source) -> pathlib.Path:
    """A registry root where model 'digits' version 1 is registered, for tests to copy.

    Copying it saves each test a definition check, which starts a Python process importing PyTensor.
    """
    root = tmp_path_factory.mktemp("template") / "registry"
    server = create_server("127.0.0.1:0", root=root, compile_cache=compile_cache, limits=StreamLimits())
    server.start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            model_registry_pb2_grpc.ModelRegistryStub(channel).RegisterModel(
                model_registry_pb2.RegisterModelRequest(name="digits", source=model_source), timeout=120
            )
    finally:
        server.stop(grace_s=None)
    return root

