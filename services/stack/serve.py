"""Builds and runs the servers of one or all roles in this process until a signal stops them."""

import logging
import os
import signal
import threading

from lasagne_engine import rpc
from lasagne_engine.blobstore import configured_blob_store
from lasagne_engine.config import Addresses, Paths, StreamLimits
from lasagne_engine.security import ServerSecurity, config_path

logger = logging.getLogger(__name__)

ROLES = ("registry", "data", "trainer")
# Seconds that calls in flight get to finish after SIGTERM before they are cancelled.
SHUTDOWN_GRACE_S = 10.0
GRACE_VARIABLE = "LASAGNE_ENGINE_SHUTDOWN_GRACE_S"


def shutdown_grace_s() -> float:
    """Return ``$LASAGNE_ENGINE_SHUTDOWN_GRACE_S``, or 10 s when it is not set.

    Raises
    ------
    ValueError
        If the variable is not a number of seconds, 0 or more.
    """
    text = os.environ.get(GRACE_VARIABLE, "")
    if not text:
        return SHUTDOWN_GRACE_S
    try:
        grace_s = float(text)
    except ValueError:
        grace_s = -1.0
    if not grace_s >= 0:
        raise ValueError(f"{GRACE_VARIABLE}={text!r} must be a number of seconds, 0 or more.")
    return grace_s


def build_servers(
    roles: list[str],
    *,
    paths: Paths,
    addresses: Addresses,
    limits: StreamLimits | None = None,
    security: ServerSecurity | None = None,
) -> dict[str, rpc.Server]:
    """Create one server per role on its address, in the order registry, data, trainer; none is started.

    The trainer needs the other two services' addresses, which ``addresses`` gives whether or not
    they run in this process. ``security`` defaults to the environment and the ``[server]``
    section of the config file in ``paths.home``. The registry and the data service share the
    blob store that ``LASAGNE_ENGINE_BLOB_URL`` or the config file's ``[blob_store]`` names;
    without one, each keeps its blobs in its own folder under ``paths.home``.
    """
    unknown = [role for role in roles if role not in ROLES]
    if unknown:
        raise ValueError(f"Unknown role {unknown[0]!r}; choose from {', '.join(ROLES)} or 'all'.")
    limits = limits or StreamLimits.from_env()
    security = security if security is not None else ServerSecurity.from_env(config_path(paths.home))
    # None keeps each service's blobs in its own folder under paths.home.
    blob_store = configured_blob_store(config_path(paths.home)) if {"registry", "data"} & set(roles) else None
    servers: dict[str, rpc.Server] = {}
    if "registry" in roles:
        from lasagne_engine.model_registry import add_model_registry

        servers["registry"] = rpc.Server(addresses.registry, limits=limits, security=security)
        add_model_registry(
            servers["registry"], root=paths.registry, blob_store=blob_store, compile_cache=paths.compile_cache
        )
    if "data" in roles:
        from lasagne_engine.data_service import add_data_service

        servers["data"] = rpc.Server(addresses.data, limits=limits, security=security)
        add_data_service(servers["data"], root=paths.data, blob_store=blob_store)
    if "trainer" in roles:
        from lasagne_engine.trainer import add_trainer

        servers["trainer"] = rpc.Server(addresses.trainer, limits=limits, security=security)
        servers["trainer"].trainer = add_trainer(
            servers["trainer"],
            root=paths.trainer,
            registry_address=addresses.registry if "registry" not in servers else servers["registry"].address,
            data_address=addresses.data if "data" not in servers else servers["data"].address,
            compile_cache=paths.compile_cache,
        )
    return servers


def stop_servers(servers: dict[str, rpc.Server], grace_s: float = SHUTDOWN_GRACE_S) -> None:
    """Wind down the trainer's sessions first, while they can still reach the registry, then drain
    every server at once, so the whole stop takes about one grace period."""
    for server in servers.values():
        trainer = getattr(server, "trainer", None)
        if trainer is not None:
            trainer.manager.close()
    stopping = []
    for role in reversed(ROLES):
        server = servers.get(role)
        if server is not None:
            stopping.append((server, server.begin_stop(grace_s)))
    for server, stopped in stopping:
        stopped.wait()
        logger.info("Stopped the server on %s", server.address)


def serve(roles: list[str], *, paths: Paths, addresses: Addresses) -> None:
    """Run the servers of ``roles`` until SIGTERM or SIGINT, then drain them.

    After the first signal the servers take no new calls (they fail with UNAVAILABLE), and calls
    in flight get ``$LASAGNE_ENGINE_SHUTDOWN_GRACE_S`` seconds (default 10) to finish before they
    are cancelled. A second signal cancels them at once.
    """
    grace_s = shutdown_grace_s()
    servers = build_servers(roles, paths=paths, addresses=addresses)
    for server in servers.values():
        server.start()
    logger.info("LasagneEngine %s serving from %s", "+".join(servers), paths.home)

    stopping = threading.Event()

    def request_stop(signal_number, _frame) -> None:
        name = signal.Signals(signal_number).name
        if not stopping.is_set():
            logger.info("Received %s; draining calls in flight for up to %.1f s", name, grace_s)
            stopping.set()
            return
        logger.warning("Received %s while draining; cancelling the calls still in flight", name)
        for server in servers.values():
            # stop(0) cancels at once and wakes the stop() that is waiting out the grace period.
            server.grpc_server.stop(0)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    stopping.wait()
    stop_servers(servers, grace_s)
    logger.info("LasagneEngine stopped")
