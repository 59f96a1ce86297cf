"""Builds the Trainer service and its server."""

import os
import pathlib
import sys

from lasagne_engine import rpc
from lasagne_engine.config import StreamLimits
from lasagne_engine.trainer.devices import DeviceInfo, discover_devices
from lasagne_engine.trainer.launcher import LocalLauncher
from lasagne_engine.trainer.manager import SessionManager
from lasagne_engine.trainer.servicer import TrainerServicer
from lasagne_engine.v1 import trainer_pb2_grpc

SERVICE_NAME = "lasagne_engine.v1.Trainer"


def _reachable(address: str) -> str:
    host, _, port = address.rpartition(":")
    if host in ("0.0.0.0", "[::]", ""):
        return f"127.0.0.1:{port}"
    return address


def add_trainer(
    server: rpc.Server,
    *,
    root: pathlib.Path,
    registry_address: str,
    data_address: str,
    compile_cache: pathlib.Path,
    devices: list[DeviceInfo] | None = None,
    backend: str | None = None,
    python_executable: str = sys.executable,
    statistics_every_steps: int | None = None,
) -> TrainerServicer:
    """Add the Trainer service to ``server``; session processes attach back to its address.

    ``devices`` defaults to the discovered GPUs, or else one CPU device per core; ``backend`` to
    ``$LASAGNE_ENGINE_BACKEND`` or ``auto``; ``statistics_every_steps`` to
    ``$LASAGNE_ENGINE_STATISTICS_EVERY_STEPS`` or 50.
    """
    if statistics_every_steps is None:
        statistics_every_steps = int(os.environ.get("LASAGNE_ENGINE_STATISTICS_EVERY_STEPS", "50"))
    manager = SessionManager(
        root,
        registry_address=registry_address,
        data_address=data_address,
        trainer_address=_reachable(server.address),
        launcher=LocalLauncher(compile_cache=compile_cache, python_executable=python_executable),
        devices=devices or discover_devices(),
        backend=backend or os.environ.get("LASAGNE_ENGINE_BACKEND", "auto"),
        statistics_every_steps=statistics_every_steps,
    )
    servicer = TrainerServicer(manager)
    trainer_pb2_grpc.add_TrainerServicer_to_server(servicer, server.grpc_server)
    server.add_service_name(SERVICE_NAME)
    return servicer


def create_server(
    address: str,
    *,
    root: pathlib.Path,
    registry_address: str,
    data_address: str,
    compile_cache: pathlib.Path,
    limits: StreamLimits | None = None,
    **options,
) -> tuple[rpc.Server, TrainerServicer]:
    """Create a server with the Trainer service on ``address``; the caller starts it."""
    server = rpc.Server(address, limits=limits)
    servicer = add_trainer(
        server, root=root, registry_address=registry_address, data_address=data_address,
        compile_cache=compile_cache, **options,
    )
    return server, servicer
