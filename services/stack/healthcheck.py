"""Container health check: exit 0 when a service's ``grpc.health.v1`` endpoint reports SERVING.

Run as ``lasagne-engine-healthcheck ROLE`` or ``python -m lasagne_engine.stack.healthcheck ROLE``,
where ROLE is ``registry``, ``data`` or ``trainer`` (the address comes from the same variable
the service listens on) or a ``host:port``.
"""

import argparse
import sys
from collections.abc import Sequence

from lasagne_engine import rpc
from lasagne_engine.config import Addresses
from lasagne_engine.security import ClientSecurity
from lasagne_engine.stack.daemon import SERVICE_NAMES

DEFAULT_TIMEOUT_S = 3.0
EXIT_SERVING = 0
EXIT_NOT_SERVING = 1
_WILDCARD_HOSTS = ("0.0.0.0", "[::]", "::", "")


def reachable_address(address: str) -> str:
    """Return ``address`` with a wildcard host (``0.0.0.0``, ``[::]``) replaced by 127.0.0.1.

    A service that listens on every interface is reached through the loopback interface from
    inside its own container.
    """
    host, separator, port = address.rpartition(":")
    if not separator:
        raise ValueError(f"Address {address!r} has no port; write it as host:port, for example 127.0.0.1:50151.")
    if host in _WILDCARD_HOSTS:
        return f"127.0.0.1:{port}"
    return address


def resolve_target(target: str, service: str | None = None) -> tuple[str, str]:
    """Return the address to check and the health service name for ``target``.

    ``target`` is a role (the address comes from ``LASAGNE_ENGINE_<ROLE>_ADDRESS`` and the service
    name from the role) or a ``host:port`` (the service name is ``service``, default the whole
    server).
    """
    if target in SERVICE_NAMES:
        address = getattr(Addresses.from_env(), target)
        return reachable_address(address), service if service is not None else SERVICE_NAMES[target]
    if ":" not in target:
        raise ValueError(
            f"Unknown role {target!r}; give one of {', '.join(SERVICE_NAMES)} or an address as host:port."
        )
    return reachable_address(target), service or ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lasagne-engine-healthcheck",
        description="Exit 0 when a LasagneEngine service reports SERVING through grpc.health.v1, else 1.",
    )
    parser.add_argument("target", help="registry, data, trainer, or host:port of any gRPC server")
    parser.add_argument(
        "--service",
        default=None,
        help="health service name to check; default the role's service, or the whole server for host:port",
    )
    parser.add_argument(
        "--timeout-s", type=float, default=DEFAULT_TIMEOUT_S, help=f"deadline of the check in seconds (default {DEFAULT_TIMEOUT_S:g})"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    if arguments.timeout_s <= 0:
        parser.error(f"--timeout-s {arguments.timeout_s!r} must be a positive number of seconds")
    try:
        address, service = resolve_target(arguments.target, arguments.service)
    except ValueError as error:
        parser.error(str(error))
    try:
        # The health service needs no token, but a server with TLS needs the CA to be reached.
        security = ClientSecurity.from_env()
    except ValueError as error:
        print(f"Invalid client settings: {error}", file=sys.stderr)
        return EXIT_NOT_SERVING

    if rpc.is_serving(address, timeout_s=arguments.timeout_s, service=service, security=security):
        return EXIT_SERVING
    print(
        f"{service or 'the server'} at {address} is not SERVING, or did not respond within {arguments.timeout_s:g} s",
        file=sys.stderr,
    )
    return EXIT_NOT_SERVING


if __name__ == "__main__":
    sys.exit(main())
