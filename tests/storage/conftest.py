"""Fixtures of the storage suite: every test that takes ``blob_store`` runs on both backends."""

import os
import pathlib

import pytest

from lasagne_engine.blobstore import LocalBlobStore

from .s3_server import MotoServer, moto_installed

BACKENDS = ["local", "s3"]
EXAMPLE_MODEL = pathlib.Path(__file__).parents[2] / "clients" / "examples" / "digits_mlp.py"
# Short pauses between retries keep the fault tests fast; the attempts are the production default.
FAST_BACKOFF_S = 0.01


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 for the whole test session.

    Skipped where moto is not installed, except in CI (``CI=true``), where that fails the test,
    so that CI never passes without running the S3 half of the suite.
    """
    if not moto_installed():
        message = "moto[server] is not installed; install the dev extras with pip install -e '.[dev]'"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    server = MotoServer(tmp_path_factory.mktemp("moto") / "server.log").start()
    yield server
    server.stop()


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def make_blob_store(backend, tmp_path, request):
    """Return a function that opens a blob store of the test's backend; each call gets a new folder or bucket."""
    created = []

    def make(**options):
        if backend == "local":
            return LocalBlobStore(tmp_path / f"blobs-{len(created)}")
        server = request.getfixturevalue("s3_server")
        store = server.store(backoff_s=FAST_BACKOFF_S, **options)
        created.append(store)
        return store

    yield make
    for store in created:
        store.close()


@pytest.fixture
def blob_store(make_blob_store):
    return make_blob_store()


@pytest.fixture(scope="session")
def registry_template(tmp_path_factory, compile_cache):
    """A registry root with model 'digits' version 1 registered, whose database and blobs tests copy.

    Copying saves each test a definition check, which starts a Python process that imports PyTensor.
    """
    from lasagne_engine.config import StreamLimits
    from lasagne_engine.model_registry import create_server
    from lasagne_engine.rpc import insecure_channel
    from lasagne_engine.v1 import model_registry_pb2, model_registry_pb2_grpc

    root = tmp_path_factory.mktemp("registry-template")
    server = create_server("127.0.0.1:0", root=root, compile_cache=compile_cache, limits=StreamLimits()).start()
    try:
        with insecure_channel(server.address) as channel:
            model_registry_pb2_grpc.ModelRegistryStub(channel).RegisterModel(
                model_registry_pb2.RegisterModelRequest(name="digits", source=EXAMPLE_MODEL.read_text()), timeout=300
            )
    finally:
        server.stop(grace_s=None)
    return root
