"""Builds the Trainer service and its server."""

import os
import pathlib
import sys

from lasagne_engine import rpc
from lasagne_engine.config import StreamLimits
from lasagne_engine.trainer.devices import DeviceInfo, discover_devices
from lasagne_engine.trainer.launcher import LocalLauncher
from lasagne_engine.trainer.manager import SessionManager
from lasagne_engine.trainer.metrics import DEFAULT_RETENTION_S, TrainerMetrics
from lasagne_engine.trainer.servicer import TrainerServicer
from lasagne_engine.v1 import trainer_pb2_grpc

SERVICE_NAME = "lasagne_engine.v1.Trainer"
# Port of the trainer's /metrics endpoint unless LASAGNE_ENGINE_METRICS_PORT sets another. Port 0 turns it off.
DEFAULT_METRICS_PORT = 9464


def _reachable(address: str) -> str:
    host, _, port = address.rpartition(":")
    if host in ("0.0.0.0", "[::]", ""):
        return f"127.0.0.1:{port}"
    return address


def _env_number(name: str, default: float, kind: type) -> float:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        return kind(value)
    except ValueError as error:
        raise ValueError(f"Environment variable {name}={value!r} is not a valid {kind.__name__}.") from error


def start_metrics(
    trainer_address: str, *, port: int | None = None, retention_s: float | None = None
) -> TrainerMetrics | None:
    """Create the trainer's Prometheus exporter and serve ``/metrics`` on the trainer's host.

    ``port`` defaults to ``$LASAGNE_ENGINE_METRICS_PORT`` or 9464, and 0 turns metrics off (the
    function then returns None). ``retention_s``, the seconds a finished session's series stay,
    defaults to ``$LASAGNE_ENGINE_METRICS_RETENTION_S`` or 300.

    Raises
    ------
    ValueError
        If a setting is not a number, or the port is out of range.
    OSError
        If the port cannot be bound, with the settings that change it.
    """
    if port is None:
        port = int(_env_number("LASAGNE_ENGINE_METRICS_PORT", DEFAULT_METRICS_PORT, int))
    if port == 0:
        return None
    if not 0 < port < 65536:
        raise ValueError(f"Metrics port {port} is out of range; use 1 to 65535, or 0 to turn the endpoint off.")
    if retention_s is None:
        retention_s = _env_number("LASAGNE_ENGINE_METRICS_RETENTION_S", DEFAULT_RETENTION_S, float)
    host = trainer_address.rpartition(":")[0].strip("[]") or "127.0.0.1"

    metrics = TrainerMetrics(retention_s=retention_s)
    try:
        metrics.start_http_server(port, host)
    except OSError as error:
        raise OSError(
            f"Could not serve trainer metrics on {host}:{port} ({error}); set LASAGNE_ENGINE_METRICS_PORT "
            "to a free port, or to 0 to turn the metrics endpoint off."
        ) from error
    return metrics


def place_sessions(
    *,
    compile_cache: pathlib.Path,
    python_executable: str,
    devices: list[DeviceInfo] | None,
    backend: str,
    data_cache: pathlib.Path | None = None,
):
    """Return the launcher, devices and backend that ``$LASAGNE_ENGINE_LAUNCHER`` selects.

    ``local`` (the default) starts session processes on this host's devices. ``kubernetes`` runs
    each session as a Job and treats the cluster as the devices ``k8s:0`` .. ``k8s:N-1``, with
    JAX as the ``auto`` backend when the pods get GPUs; see
    :mod:`lasagne_engine.trainer.kubernetes_jobs` for its settings.

    Raises
    ------
    ValueError
        If the variable names another launcher, or the Kubernetes settings are invalid.
    """
    kind = os.environ.get("LASAGNE_ENGINE_LAUNCHER", "") or "local"
    if kind == "local":
        launcher = LocalLauncher(
            compile_cache=compile_cache, python_executable=python_executable, data_cache=data_cache,
        )
        return launcher, devices or discover_devices(), backend
    if kind == "kubernetes":
        from lasagne_engine.trainer.kubernetes_jobs import KubernetesSettings, kubernetes_devices, session_backend
        from lasagne_engine.trainer.kubernetes_launcher import KubernetesLauncher

        settings = KubernetesSettings.from_env()
        launcher = KubernetesLauncher(settings)
        return launcher, devices or kubernetes_devices(settings), session_backend(settings, backend)
    raise ValueError(f"LASAGNE_ENGINE_LAUNCHER={kind!r} must be local or kubernetes.")


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
    metrics_port: int | None = None,
) -> TrainerServicer:
    """Add the Trainer service to ``server``; session processes attach back to its address.

    ``devices`` defaults to the discovered GPUs, or else one CPU device per core, or with the
    Kubernetes launcher to its session slots (see :func:`place_sessions`); ``backend`` to
    ``$LASAGNE_ENGINE_BACKEND`` or ``auto``; ``statistics_every_steps`` to
    ``$LASAGNE_ENGINE_STATISTICS_EVERY_STEPS`` or 50. Prometheus metrics are served on the
    server's host at ``metrics_port``, as :func:`start_metrics` describes.
    """
    if statistics_every_steps is None:
        statistics_every_steps = int(os.environ.get("LASAGNE_ENGINE_STATISTICS_EVERY_STEPS", "50"))
    launcher, devices, backend = place_sessions(
        compile_cache=compile_cache,
        python_executable=python_executable,
        devices=devices,
        backend=backend or os.environ.get("LASAGNE_ENGINE_BACKEND", "auto"),
        # Next to the trainer's folder, where default_cache_root(home) puts it for <home>/trainer.
        data_cache=root.parent / "cache" / "datasets",
    )
    metrics = start_metrics(server.address, port=metrics_port)
    try:
        manager = SessionManager(
            root,
            registry_address=registry_address,
            data_address=data_address,
            trainer_address=_reachable(server.address),
            launcher=launcher,
            devices=devices,
            backend=backend,
            statistics_every_steps=statistics_every_steps,
            metrics=metrics,
        )
    except BaseException:
        if metrics is not None:
            metrics.close()
        raise
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
