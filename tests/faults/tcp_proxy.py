"""A TCP proxy on 127.0.0.1 that forwards to one upstream server and can cut a connection midway.

Tests put it between a client and a gRPC service. :meth:`CuttingProxy.cut_next_connection` arms a
cut: the next connection is closed in both directions once the given number of bytes has gone from
the server to the client, as a dropped network link looks to both ends. Later connections pass
through untouched.
"""

import logging
import socket
import threading

logger = logging.getLogger(__name__)

RECEIVE_BYTES = 64 << 10


class CuttingProxy:
    """Forwards TCP connections from a free port of 127.0.0.1 to ``upstream`` (``host:port``).

    Attributes
    ----------
    connections : int
        Connections accepted so far.
    cuts : int
        Connections cut so far.
    downstream_bytes : list of int
        Bytes forwarded from the server to the client, per connection in the order accepted.
    """

    def __init__(self, upstream: str):
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.connections = 0
        self.cuts = 0
        self.downstream_bytes: list[int] = []
        self._cut_after_bytes: int | None = None
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._thread = threading.Thread(target=self._accept, name="cutting-proxy", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self._listener.getsockname()[1]}"

    def start(self) -> "CuttingProxy":
        self._thread.start()
        return self

    def cut_next_connection(self, after_bytes: int) -> None:
        """Close the next connection once ``after_bytes`` bytes have gone from the server to the client."""
        with self._lock:
            self._cut_after_bytes = after_bytes

    def stop(self) -> None:
        self._listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for connection in sockets:
            _close(connection)
        self._thread.join(timeout=10)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # stop() closed the listener
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                logger.warning("The test proxy could not reach %s:%d", *self.upstream, exc_info=True)
                _close(client)
                continue
            server.settimeout(None)
            with self._lock:
                number = self.connections
                self.connections += 1
                self.downstream_bytes.append(0)
                cut_after_bytes, self._cut_after_bytes = self._cut_after_bytes, None
                self._sockets.extend((client, server))
            pair = (client, server)
            threading.Thread(target=self._pump, args=(client, server, pair), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, pair, number, cut_after_bytes), daemon=True).start()

    def _pump(
        self,
        source: socket.socket,
        target: socket.socket,
        pair: tuple[socket.socket, socket.socket],
        number: int | None = None,
        cut_after_bytes: int | None = None,
    ) -> None:
        """Copy bytes from ``source`` to ``target``.

        The server-to-client pump gets the connection's ``number``, counts its bytes and cuts it.
        """
        forwarded = 0
        try:
            while True:
                data = source.recv(RECEIVE_BYTES)
                if not data:
                    break
                if cut_after_bytes is not None and forwarded + len(data) >= cut_after_bytes:
                    target.sendall(data[: cut_after_bytes - forwarded])
                    self._count(number, cut_after_bytes - forwarded)
                    with self._lock:
                        self.cuts += 1
                    logger.info("The test proxy cut a connection after %d bytes to the client", cut_after_bytes)
                    break
                target.sendall(data)
                forwarded += len(data)
                if number is not None:
                    self._count(number, len(data))
        except OSError:
            pass  # the other pump or stop() closed the sockets
        finally:
            for connection in pair:
                _close(connection)

    def _count(self, number: int, size: int) -> None:
        with self._lock:
            self.downstream_bytes[number] += size


def _close(connection: socket.socket) -> None:
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already shut down or never connected
    connection.close()
