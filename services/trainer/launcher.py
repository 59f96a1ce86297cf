"""Places session processes. The local launcher starts each as a subprocess of the trainer."""

import logging
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from lasagne_engine.compute import compute_environment
from lasagne_engine.security import ClientSecurity
from lasagne_engine.trainer.worker import TOKEN_VARIABLE

logger = logging.getLogger(__name__)

STDERR_TAIL_BYTES = 8192
# Variables a session process does not need: credentials of the services and the user's tokens.
# The TLS files and the config file are replaced by the trainer's own client settings below.
_WITHHELD_PREFIXES = ("LASAGNE_ENGINE_TOKEN", "LASAGNE_ENGINE_TLS_", "LASAGNE_ENGINE_CONFIG", "AWS_", "MINIO_")


# Pins the process to one core before anything imports numpy or gRPC, whose thread pools would
# otherwise start on every core: a thread takes the affinity of the thread that created it.
# Arguments: the core, the module to run as __main__, then that module's arguments.
_PINNED_START = (
    "import os, runpy, sys; "
    "os.sched_setaffinity(0, {int(sys.argv[1])}); "
    "module = sys.argv[2]; "
    "sys.argv = [sys.argv[0], *sys.argv[3:]]; "
    "runpy.run_module(module, run_name='__main__', alter_sys=True)"
)
# Thread counts of the math libraries; a process pinned to one core gets one thread in each.
THREAD_COUNT_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def limit_threads_to_one_core(environment: dict[str, str]) -> None:
    """Give every math library in a process started with ``environment`` a single thread."""
    for variable in THREAD_COUNT_VARIABLES:
        environment[variable] = "1"
    environment["XLA_FLAGS"] = (environment.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()


def pinned_command(python_executable: str, core: int, module: str, arguments: list[str]) -> list[str]:
    """Return the command that runs ``python -m module arguments`` pinned to ``core`` from its start."""
    return [python_executable, "-c", _PINNED_START, str(core), module, *arguments]


def _is_session_process(pid: int, session_id: str) -> bool:
    """Tell whether ``pid`` is a live session process for ``session_id``, from its command line.

    A zombie counts as gone: its command line reads empty.
    """
    try:
        arguments = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return session_id.encode() in arguments and b"lasagne_engine.trainer.worker" in arguments


@dataclass
class LaunchRequest:
    session_id: str
    token: str
    trainer_address: str
    device: str
    backend: str
    working_dir: pathlib.Path
    # CPU core to pin the process to, for a session on a CPU device.
    cpu_core: int | None = None


def describe_exit(returncode: int) -> str:
    """Return 'exit code N' or 'signal SIGKILL' for a process's return code."""
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


def read_tail(path: pathlib.Path, max_bytes: int = STDERR_TAIL_BYTES) -> str:
    try:
        with open(path, "rb") as stream:
            stream.seek(0, os.SEEK_END)
            size = stream.tell()
            stream.seek(max(0, size - max_bytes))
            return stream.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


class LocalProcess:
    """A session process on this host, with a thread that reports its exit."""

    def __init__(self, popen: subprocess.Popen, stderr_path: pathlib.Path, on_exit: Callable[[int, str], None]):
        self.popen = popen
        self.stderr_path = stderr_path
        self._on_exit = on_exit
        self._waiter = threading.Thread(target=self._wait, name=f"session-process-{popen.pid}", daemon=True)
        self._waiter.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _wait(self) -> None:
        returncode = self.popen.wait()
        self._on_exit(returncode, read_tail(self.stderr_path))

    def running(self) -> bool:
        return self.popen.poll() is None

    def terminate(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()

    def join(self, timeout_s: float | None = None) -> None:
        self._waiter.join(timeout_s)


class LocalLauncher:
    """Starts each session as ``python -m lasagne_engine.trainer.worker`` on this host.

    A process on a GPU sees only its own device through ``CUDA_VISIBLE_DEVICES``, set before any
    compute library loads; a process on a CPU device sees no GPU.
    """

    def __init__(
        self, *, compile_cache: pathlib.Path, python_executable: str = sys.executable,
        data_cache: pathlib.Path | None = None,
    ):
        self.compile_cache = compile_cache
        self.python_executable = python_executable
        # Dataset cache shared by the sessions of this host; None leaves the session's default.
        self.data_cache = data_cache

    def environment(self, request: LaunchRequest) -> dict[str, str]:
        base = {key: value for key, value in os.environ.items() if not key.startswith(_WITHHELD_PREFIXES)}
        environment = compute_environment(self.compile_cache, backend=request.backend, base=base)
        kind, _, index = request.device.partition(":")
        if kind == "gpu":
            # nvidia-smi numbers GPUs in PCI bus order, and CUDA does so only with this variable set
            # to PCI_BUS_ID. Its default order puts the fastest first, so an index could pick another GPU.
            environment["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
            environment["CUDA_VISIBLE_DEVICES"] = index
        else:
            environment["CUDA_VISIBLE_DEVICES"] = ""
            environment.setdefault("JAX_PLATFORMS", "cpu")
        if request.cpu_core is not None:
            limit_threads_to_one_core(environment)
        if self.data_cache is not None:
            environment.setdefault("LASAGNE_ENGINE_DATA_CACHE", str(self.data_cache))
        environment[TOKEN_VARIABLE] = request.token
        # The session saves parameter sets and attaches back to the trainer, so it gets the
        # trainer's own token and TLS files, and no config file with the server's tokens.
        environment.update(ClientSecurity.from_env().environment())
        environment["PYTHONUNBUFFERED"] = "1"
        return environment

    def command(self, request: LaunchRequest) -> list[str]:
        arguments = ["--session-id", request.session_id, "--trainer", request.trainer_address]
        if request.cpu_core is not None and hasattr(os, "sched_setaffinity"):
            return pinned_command(self.python_executable, request.cpu_core, "lasagne_engine.trainer.worker", arguments)
        return [self.python_executable, "-m", "lasagne_engine.trainer.worker", *arguments]

    def end_orphan(self, session_id: str, pid: int, timeout_s: float) -> None:
        """End a session process that a previous run of the trainer started and left behind.

        Such a process checkpoints and exits once it notices that its trainer is gone. It gets
        ``timeout_s`` seconds to do so, then its process group is killed. A ``pid`` that now
        belongs to another program is left alone.
        """
        if not _is_session_process(pid, session_id):
            return
        logger.info("Session %s: waiting up to %.0f s for process %d of the previous trainer run to exit",
                    session_id, timeout_s, pid)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not _is_session_process(pid, session_id):
                logger.info("Session %s: process %d of the previous trainer run has exited", session_id, pid)
                return
            time.sleep(0.2)
        logger.warning("Session %s: process %d of the previous trainer run did not exit within %.0f s; killing it",
                       session_id, pid, timeout_s)
        try:
            # Launched with start_new_session, so the process leads its own group.
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        except PermissionError as error:
            logger.error("Session %s: could not kill process %d: %s", session_id, pid, error)
            return
        while time.monotonic() < deadline + 10 and _is_session_process(pid, session_id):
            time.sleep(0.1)

    def launch(self, request: LaunchRequest, on_exit: Callable[[int, str], None]) -> LocalProcess:
        request.working_dir.mkdir(parents=True, exist_ok=True)
        stderr_path = request.working_dir / "stderr.log"
        command = self.command(request)
        with open(stderr_path, "ab") as stderr:
            popen = subprocess.Popen(
                command,
                cwd=request.working_dir,
                env=self.environment(request),
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,
            )
        logger.info("Started session %s as process %d on %s%s", request.session_id, popen.pid, request.device,
                    f" pinned to core {request.cpu_core}" if request.cpu_core is not None else "")
        return LocalProcess(popen, stderr_path, on_exit)
