"""``lasagne-engine up``, ``down`` and ``status``: the all-in-one process in the background."""

import logging
import os
import pathlib
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from lasagne_engine import rpc
from lasagne_engine.certificates import create_development_tls
from lasagne_engine.config import Addresses, Paths
from lasagne_engine.security import ClientSecurity, ServerSecurity, config_path, load_config

logger = logging.getLogger(__name__)

SERVICE_NAMES = {
    "registry": "lasagne_engine.v1.ModelRegistry",
    "data": "lasagne_engine.v1.DataService",
    "trainer": "lasagne_engine.v1.Trainer",
}
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


@dataclass
class ServiceStatus:
    role: str
    address: str
    serving: bool


def service_status(addresses: Addresses, security: ClientSecurity | None = None) -> list[ServiceStatus]:
    """Check each service's health endpoint, over TLS when ``security`` gives a CA."""
    return [
        ServiceStatus(
            role, getattr(addresses, role), rpc.is_serving(getattr(addresses, role), service=name, security=security)
        )
        for role, name in SERVICE_NAMES.items()
    ]


def set_up_development_security(paths: Paths, *, require_client_certificates: bool = False) -> pathlib.Path:
    """Create a local CA, certificates and tokens under ``paths.home`` and record them in the config file.

    Existing certificates, tokens and other settings of the config file are kept. The file is
    written with mode 0600 because it contains the tokens. Returns the config file's path.

    The ``[server]`` section gets the server certificate and one read-write and one read-only
    token. The ``[client]`` section gets the CA, the client certificate and the read-write token,
    so the command and the SDK on this machine connect without further settings.
    """
    path = config_path(paths.home)
    config = load_config(path)
    server = config.setdefault("server", {})
    client = config.setdefault("client", {})
    tls = create_development_tls(paths.home / "tls")

    server.setdefault("tls_cert", str(tls.server_cert))
    server.setdefault("tls_key", str(tls.server_key))
    if require_client_certificates:
        server.setdefault("tls_client_ca", str(tls.ca_cert))
    if not server.get("read_write_tokens"):
        server["read_write_tokens"] = [secrets.token_urlsafe(32)]
    if not server.get("read_only_tokens"):
        server["read_only_tokens"] = [secrets.token_urlsafe(32)]
    client.setdefault("tls_ca", str(tls.ca_cert))
    client.setdefault("tls_cert", str(tls.client_cert))
    client.setdefault("tls_key", str(tls.client_key))
    client.setdefault("token", server["read_write_tokens"][0])

    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as stream:
        stream.write(_toml(config))
    os.chmod(path, 0o600)
    # Reading both sections back checks every path and token before a server relies on them.
    ServerSecurity.from_env(path)
    ClientSecurity.from_env(path)
    logger.info("Wrote TLS files and tokens for development to %s", path)
    return path


def _toml(config: dict) -> str:
    lines = ["# Written by 'lasagne-engine up --tls'. It contains tokens: keep it private (mode 0600).", ""]
    for section, values in config.items():
        if not isinstance(values, dict):
            raise ValueError(f"Config key {section!r} must be a table such as [{section}].")
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value, key)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value, key: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item, key) for item in value) + "]"
    raise ValueError(f"Config key {key!r} has a {type(value).__name__} value, which 'up --tls' cannot rewrite.")


def _pid_file(paths: Paths):
    return paths.run / "engine.pid"


def running_pid(paths: Paths) -> int | None:
    """Return the pid recorded by ``up`` if that process still exists."""
    try:
        pid = int(_pid_file(paths).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def up(
    paths: Paths,
    addresses: Addresses,
    *,
    timeout_s: float = START_TIMEOUT_S,
    security: ClientSecurity | None = None,
) -> tuple[int | None, bool]:
    """Start ``lasagne-engine serve all`` in the background unless every service already reports SERVING.

    The process reads its TLS files and tokens from the config file in ``paths.home``, never
    from its command line. ``security`` is what this process checks the services' health with;
    default: read from the environment and that config file.

    Returns the pid (None when the services were already up without a pid file of ours) and
    whether a new process was started.

    Raises
    ------
    RuntimeError
        If the services do not report SERVING within ``timeout_s``; the message ends with the log's tail.
    """
    security = security if security is not None else ClientSecurity.from_env(config_path(paths.home))
    if all(status.serving for status in service_status(addresses, security)):
        return running_pid(paths), False
    paths.run.mkdir(parents=True, exist_ok=True)
    log_path = paths.run / "engine.log"
    environment = dict(os.environ)
    environment["LASAGNE_ENGINE_HOME"] = str(paths.home)
    environment["LASAGNE_ENGINE_REGISTRY_ADDRESS"] = addresses.registry
    environment["LASAGNE_ENGINE_DATA_ADDRESS"] = addresses.data
    environment["LASAGNE_ENGINE_TRAINER_ADDRESS"] = addresses.trainer
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "lasagne_engine.client.cli", "serve", "all"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=environment,
            start_new_session=True,
        )
    _pid_file(paths).write_text(f"{process.pid}\n")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        if all(status.serving for status in service_status(addresses, security)):
            logger.info("Started LasagneEngine as process %d", process.pid)
            return process.pid, True
        time.sleep(0.2)
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
    if process.poll() is None:
        process.terminate()
    raise RuntimeError(f"LasagneEngine did not start within {timeout_s:.0f} s; the end of {log_path}:\n{tail}")


def down(paths: Paths, *, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
    """Stop the process started by ``up``; return its pid, or None when none was running."""
    pid = running_pid(paths)
    if pid is None:
        _pid_file(paths).unlink(missing_ok=True)
        return None
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if running_pid(paths) is None:
            break
        time.sleep(0.2)
    else:
        logger.warning("Process %d did not stop within %.0f s; killing it", pid, timeout_s)
        os.kill(pid, signal.SIGKILL)
    _pid_file(paths).unlink(missing_ok=True)
    return pid
