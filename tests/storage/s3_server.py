"""moto's S3 server in a subprocess on 127.0.0.1, for the storage tests and the benchmarks.

No MinIO server binary installs from PyPI, so moto's server (``moto[server]``) replaces it here.
The engine talks to it through the ``minio`` SDK exactly as it talks to MinIO. The server keeps
S3's rule that every part but the last of a multipart upload has at least 5 MiB.
"""

import contextlib
import os
import pathlib
import socket
import subprocess
import sys
import time
import uuid

from lasagne_engine.blobstore import S3BlobStore, S3Location
from minio.credentials import StaticProvider

# moto accepts any key; these only make the SDK sign its requests as it would for MinIO.
ACCESS_KEY = "lasagne-test"
SECRET_KEY = "lasagne-test-secret"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def moto_installed() -> bool:
    try:
        import moto.server  # noqa: F401
    except ImportError:
        return False
    return True


class MotoServer:
    """moto's S3 API on a free port of 127.0.0.1, in its own process.

    Parameters
    ----------
    log_path : pathlib.Path
        File that receives the server's output.
    """

    def __init__(self, log_path: pathlib.Path):
        self.log_path = log_path
        self.port = 0
        self._process: subprocess.Popen | None = None
        self._log = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, *, timeout_s: float = 60.0) -> "MotoServer":
        """Start the server and wait until it accepts connections.

        Raises
        ------
        RuntimeError
            If the process exits or does not listen within ``timeout_s``.
        """
        self._log = open(self.log_path, "ab")
        # A port found free may be taken before moto binds it, so a failed start tries another.
        for _ in range(3):
            self.port = free_port()
            self._process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            if self._wait_listening(timeout_s):
                return self
            self._terminate()
        raise RuntimeError(f"moto's S3 server did not start; its output is in {self.log_path}.")

    def stop(self) -> None:
        self._terminate()
        if self._log is not None:
            self._log.close()
            self._log = None

    def store(self, *, prefix: str = "", endpoint: str | None = None, **options) -> S3BlobStore:
        """Return a store on a new bucket of this server; ``options`` go to :class:`S3BlobStore`.

        ``endpoint`` sends the requests elsewhere, such as to a proxy in front of this server.
        """
        location = S3Location(
            bucket=f"test-{uuid.uuid4().hex[:16]}",
            prefix=prefix,
            endpoint=endpoint or self.endpoint,
            secure=False,
            region="us-east-1",
        )
        store = S3BlobStore(location, credentials=StaticProvider(ACCESS_KEY, SECRET_KEY), **options)
        store.ensure_bucket()
        return store

    def _wait_listening(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
            time.sleep(0.1)
        return False

    def _terminate(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None
