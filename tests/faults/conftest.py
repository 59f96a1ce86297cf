"""Services in processes of their own on 127.0.0.1, for tests that kill or stop them with signals."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from lasagne_engine import rpc
from lasagne_engine.stack.daemon import SERVICE_NAMES
from tests.conftest import free_port
from tests.security.services import copy_registry, register_template

START_TIMEOUT_S = 60.0


class ServiceProcess:
    """One role of ``lasagne-engine serve`` in a subprocess, restartable on the same port and data folder.

    Parameters
    ----------
    role : str
        ``registry`` or ``data``.
    home : pathlib.Path
        Data folder of the process.
    grace_s : float
        ``LASAGNE_ENGINE_SHUTDOWN_GRACE_S`` of the process.
    """

    def __init__(self, role: str, home: pathlib.Path, *, grace_s: float = 10.0):
        self.role = role
        self.home = home
        self.address = f"127.0.0.1:{free_port()}"
        self.grace_s = grace_s
        self.log_path = home / f"{role}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> "ServiceProcess":
        environment = {
            **os.environ,
            f"LASAGNE_ENGINE_{'DATA' if self.role == 'data' else self.role.upper()}_ADDRESS": self.address,
            "LASAGNE_ENGINE_SHUTDOWN_GRACE_S": str(self.grace_s),
            "LASAGNE_ENGINE_CONFIG": os.devnull,
        }
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "lasagne_engine.client.cli", "--home", str(self.home), "serve", self.role],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=environment,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not rpc.is_serving(self.address, service=SERVICE_NAMES[self.role], timeout_s=0.5):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"The {self.role} process did not start; its log:\n{self.log()}")
            time.sleep(0.1)
        return self

    def signal(self, number: signal.Signals) -> None:
        self.process.send_signal(number)

    def kill(self) -> int:
        """SIGKILL the process and return its exit status."""
        self.process.kill()
        return self.process.wait(timeout=10)

    def wait(self, timeout_s: float) -> int:
        return self.process.wait(timeout=timeout_s)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture(scope="package")
def registry_template(tmp_path_factory, compile_cache) -> pathlib.Path:
    return register_template(tmp_path_factory.mktemp("template") / "registry", compile_cache)


@pytest.fixture
def start_service(tmp_path, registry_template):
    """Return a function that starts a service process over ``tmp_path``; every process is killed afterwards."""
    started: list[ServiceProcess] = []

    def start(role: str, *, grace_s: float = 10.0) -> ServiceProcess:
        home = tmp_path / "home"
        if role == "registry" and not (home / "registry").exists():
            copy_registry(registry_template, home / "registry")
        service = ServiceProcess(role, home, grace_s=grace_s).start()
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()
