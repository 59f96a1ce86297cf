"""An HTTP proxy on 127.0.0.1 that forwards to one upstream server and breaks chosen requests.

The S3 tests put it between the blob store and moto's server. A policy function receives each request
and returns the fault to inject, or None to forward it untouched:

- :class:`Drop` closes the connection without forwarding, as a lost request looks.
- :class:`LoseResponse` forwards, then closes without responding, as a lost response looks.
- :class:`Delay` waits before forwarding, as an overloaded server looks.
- :class:`Truncate` forwards and sends only the first bytes of the response body.
- :class:`Fail` responds with an S3 error document, without forwarding.
"""

import dataclasses
import http.client
import http.server
import logging
import socketserver
import threading
import time
from collections.abc import Callable
from xml.sax.saxutils import escape

logger = logging.getLogger(__name__)

_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te"})


@dataclasses.dataclass(frozen=True)
class ProxiedRequest:
    method: str
    path: str
    body_bytes: int

    @property
    def query(self) -> str:
        return self.path.partition("?")[2]


@dataclasses.dataclass(frozen=True)
class Drop:
    pass


@dataclasses.dataclass(frozen=True)
class LoseResponse:
    pass


@dataclasses.dataclass(frozen=True)
class Delay:
    seconds: float


@dataclasses.dataclass(frozen=True)
class Truncate:
    body_bytes: int


@dataclasses.dataclass(frozen=True)
class Fail:
    status: int
    code: str
    message: str = "injected by the test proxy"


Fault = Drop | LoseResponse | Delay | Truncate | Fail
Policy = Callable[[ProxiedRequest], Fault | None]


class FaultyProxy:
    """Forwards HTTP/1.1 requests from a free port of 127.0.0.1 to ``upstream`` (``host:port``).

    Attributes
    ----------
    log : list of (ProxiedRequest, Fault or None)
        Every request, in arrival order, with the fault it got.
    """

    def __init__(self, upstream: str, policy: Policy | None = None):
        self.upstream_host, port = upstream.rsplit(":", 1)
        self.upstream_port = int(port)
        self.policy: Policy = policy or (lambda request: None)
        self.log: list[tuple[ProxiedRequest, Fault | None]] = []
        self._log_lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._server.serve_forever, name="faulty-proxy", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "FaultyProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def faults(self) -> list[tuple[ProxiedRequest, Fault]]:
        with self._log_lock:
            return [(request, fault) for request, fault in self.log if fault is not None]

    def _record(self, request: ProxiedRequest, fault: Fault | None) -> None:
        with self._log_lock:
            self.log.append((request, fault))


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address) -> None:
        # A client that gave up on a delayed request leaves a broken pipe here, which is expected.
        logger.debug("The test proxy's connection from %s ended with an error", client_address, exc_info=True)


def _handler_for(proxy: FaultyProxy) -> type:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's signature
            logger.debug("proxy: " + format, *args)

        def handle_any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            request = ProxiedRequest(method=self.command, path=self.path, body_bytes=length)
            fault = proxy.policy(request)
            proxy._record(request, fault)

            if isinstance(fault, Drop):
                self.close_connection = True
                return
            if isinstance(fault, Fail):
                self._send_error_document(fault)
                return
            if isinstance(fault, Delay):
                time.sleep(fault.seconds)

            status, reason, headers, response_body = self._forward(body)
            if isinstance(fault, LoseResponse):
                self.close_connection = True
                return
            self.send_response_only(status, reason)
            for name, value in headers:
                self.send_header(name, value)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(response_body)))
            self.end_headers()
            if isinstance(fault, Truncate):
                self.wfile.write(response_body[: fault.body_bytes])
                self.wfile.flush()
                self.close_connection = True
                return
            if self.command != "HEAD":
                self.wfile.write(response_body)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_any

        def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
            connection = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
            try:
                headers = {name: value for name, value in self.headers.items() if name.lower() not in _HOP_BY_HOP}
                connection.request(self.command, self.path, body=body or None, headers=headers)
                response = connection.getresponse()
                response_body = response.read()
                kept = [
                    (name, value)
                    for name, value in response.getheaders()
                    if name.lower() not in _HOP_BY_HOP and (name.lower() != "content-length" or self.command == "HEAD")
                ]
                return response.status, response.reason, kept, response_body
            finally:
                connection.close()

        def _send_error_document(self, fault: Fail) -> None:
            document = (
                '<?xml version="1.0" encoding="UTF-8"?>'
                f"<Error><Code>{fault.code}</Code><Message>{fault.message}</Message>"
                f"<Resource>{escape(self.path)}</Resource><RequestId>proxy</RequestId></Error>"
            ).encode()
            self.send_response_only(fault.status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(document)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(document)

    return Handler
