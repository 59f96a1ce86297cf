"""Builds and runs the servers of one or all roles in this process until a signal stops them."""

import logging
import signal
import threading

from lasagne_engine import rpc
from lasagne_engine.config import Addresses, Paths, StreamLimits

logger = logging.getLogger(__name__)

ROLES = ("registry", "data", "trainer")
SHUTDOWN_GRACE_S = 10.0


def build_servers(
    roles: list[str], *, paths: Paths, addresses: Addresses, limits: StreamLimits | None = None
) -> dict[str, rpc.Server]:
    """Create one server per role on its address, in the order registry, data, trainer; none is started.

    The trainer needs the other two services' addresses, which ``addresses`` gives whether or not
    they run in this process.
    """
    unknown = [role for role in roles if role not in ROLES]
    if unknown:
        raise ValueError(f"Unknown role {unknown[0]!r}; choose from {', '.join(ROLES)} or 'all'.")
    limits = limits or StreamLimits.from_env()
    servers: dict[str, rpc.Server] = {}
    if "registry" in roles:
        from lasagne_engine.model_registry import add_model_registry

        servers["registry"] = rpc.Server(addresses.registry, limits=limits)
        add_model_registry(servers["registry"], root=paths.registry, compile_cache=paths.compile_cache)
    if "data" in roles:
        from lasagne_engine.data_service import add_data_service

        servers["data"] = rpc.Server(addresses.data, limits=limits)
        add_data_service(servers["data"], root=paths.data)
    if "trainer" in roles:
        from lasagne_engine.trainer import add_trainer

        servers["trainer"] = rpc.Server(addresses.trainer, limits=limits)
        servers["trainer"].trainer = add_trainer(
            servers["trainer"],
            root=paths.trainer,
            registry_address=addresses.registry if "registry" not in servers else servers["registry"].address,
            data_address=addresses.data if "data" not in servers else servers["data"].address,
            compile_cache=paths.compile_cache,
        )
    return servers


def stop_servers(servers: dict[str, rpc.Server], grace_s: float = SHUTDOWN_GRACE_S) -> None:
    """Stop the trainer first, so its sessions can still reach the registry while they wind down."""
    for role in reversed(ROLES):
        server = servers.get(role)
        if server is None:
            continue
        trainer = getattr(server, "trainer", None)
        if trainer is not None:
            trainer.manager.close()
        server.stop(grace_s)


def serve(roles: list[str], *, paths: Paths, addresses: Addresses) -> None:
    """Run the servers of ``roles`` until SIGTERM or SIGINT."""
    servers = build_servers(roles, paths=paths, addresses=addresses)
    for server in servers.values():
        server.start()
    logger.info("LasagneEngine %s serving from %s", "+".join(servers), paths.home)

    stopping = threading.Event()

    def request_stop(signal_number, _frame) -> None:
        logger.info("Received %s; shutting down", signal.Signals(signal_number).name)
        stopping.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    stopping.wait()
    stop_servers(servers)
    logger.info("LasagneEngine stopped")
