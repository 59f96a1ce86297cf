"""Fixtures shared by every test: the compute environment and a full stack on loopback ports."""

import os
import pathlib
import socket

import pytest

from lasagne_engine.compute import compute_environment

REPOSITORY_ROOT = pathlib.Path(__file__).resolve().parent.parent
# One stable folder for PyTensor's and JAX's compile caches, kept between runs: a cold cache costs
# the default backend about two minutes of Numba compilation for the digits perceptron.
COMPILE_CACHE = pathlib.Path(os.environ.get("LASAGNE_ENGINE_COMPILE_CACHE", REPOSITORY_ROOT / ".cache" / "compile-cache"))

# PyTensor reads its flags once, at import, so they are set before any test imports it.
os.environ.update(compute_environment(COMPILE_CACHE, backend="default"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many trainers run at once in the suite, so none serves metrics on the fixed default port. The
# tests that check metrics pass a port of their own.
os.environ["LASAGNE_ENGINE_METRICS_PORT"] = "0"
# The developer's own tokens and TLS files ('lasagne-engine up --tls') must not reach the suite's
# servers and clients. The security tests pass theirs explicitly.
os.environ["LASAGNE_ENGINE_CONFIG"] = os.devnull
for _variable in [name for name in os.environ if name.startswith(("LASAGNE_ENGINE_TOKEN", "LASAGNE_ENGINE_TLS_"))]:
    del os.environ[_variable]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def compile_cache() -> pathlib.Path:
    """Return the shared compile cache, filled once with the digits perceptron's step functions.

    Compiling here, once, spares session processes that start together (three trainers in one
    test, each pinning its session to its own "cpu:0", which is the same core) from each paying
    the cold Numba compilation at the same time.
    """
    COMPILE_CACHE.mkdir(parents=True, exist_ok=True)
    from lasagne_engine.client.demo import MODEL_SOURCE, digits_split
    from lasagne_engine.modeldef import build_model
    from lasagne_engine.trainer.training import SessionRun, TrainingData

    arrays = digits_split()
    data = TrainingData(arrays["X_train"], arrays["y_train"], arrays["X_val"], arrays["y_val"])
    # The demo's shapes, and the small ones most session tests use: static shapes are part of
    # the compiled code, so each pair fills its own cache entries.
    for hidden_units, batch_size in ((128, 32), (32, 8)):
        built = build_model(MODEL_SOURCE.read_text(), {"hidden_units": hidden_units})
        SessionRun(built, data, optimizer="adam", learning_rate=1e-3, batch_size=batch_size, seed=0,
                   statistics_every_steps=50).compile()
    return COMPILE_CACHE


class Stack:
    """The three services in this process, each on its own loopback port, with a client."""

    def __init__(self, home: pathlib.Path, compile_cache: pathlib.Path, *, backend: str = "default", devices=None):
        from lasagne_engine import rpc
        from lasagne_engine.client import Engine
        from lasagne_engine.data_service import add_data_service
        from lasagne_engine.model_registry import add_model_registry
        from lasagne_engine.trainer import add_trainer
        from lasagne_engine.trainer.devices import cpu_devices

        self.home = home
        self.registry = rpc.Server("127.0.0.1:0")
        add_model_registry(self.registry, root=home / "registry", compile_cache=compile_cache)
        self.data = rpc.Server("127.0.0.1:0")
        add_data_service(self.data, root=home / "data")
        self.trainer = rpc.Server("127.0.0.1:0")
        self.trainer_servicer = add_trainer(
            self.trainer,
            root=home / "trainer",
            registry_address=self.registry.address,
            data_address=self.data.address,
            compile_cache=compile_cache,
            devices=devices or cpu_devices(1, memory_budget_bytes=4 << 30),
            backend=backend,
        )
        for server in (self.registry, self.data, self.trainer):
            server.start()
        self.engine = Engine(
            registry_address=self.registry.address,
            data_address=self.data.address,
            trainer_address=self.trainer.address,
        )

    def stop(self) -> None:
        self.engine.close()
        self.trainer_servicer.manager.close()
        for server in (self.trainer, self.data, self.registry):
            server.stop(grace_s=1.0)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, compile_cache):
    running = Stack(tmp_path_factory.mktemp("stack"), compile_cache)
    yield running
    running.stop()
