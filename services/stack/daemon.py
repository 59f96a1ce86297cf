"""``lasagne-engine up``, ``down`` and ``status``: the all-in-one process in the background."""

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from lasagne_engine import rpc
from lasagne_engine.config import Addresses, Paths

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


def service_status(addresses: Addresses) -> list[ServiceStatus]:
    """Check each service's health endpoint."""
    return [
        ServiceStatus(role, getattr(addresses, role), rpc.is_serving(getattr(addresses, role), service=name))
        for role, name in SERVICE_NAMES.items()
    ]


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


def up(paths: Paths, addresses: Addresses, *, timeout_s: float = START_TIMEOUT_S) -> tuple[int | None, bool]:
    """Start ``lasagne-engine serve all`` in the background unless every service already reports SERVING.

    Returns the pid (None when the services were already up without a pid file of ours) and
    whether a new process was started.

    Raises
    ------
    RuntimeError
        If the services do not report SERVING within ``timeout_s``; the message ends with the log's tail.
    """
    if all(status.serving for status in service_status(addresses)):
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
        if all(status.serving for status in service_status(addresses)):
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
