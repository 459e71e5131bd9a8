"""A TCP proxy on 127.0.0.1 whose connections can go silent; a server that never answers.

:class:`TcpProxy` forwards every connection to PostgreSQL, over TCP or to its
unix socket (the embedded server listens only there; :func:`server_address`
finds where the test server is). :meth:`TcpProxy.silence`
turns the connections open at that moment half-open: their sockets stay
open (the kernel keeps acknowledging what the client sends) but nothing is
forwarded either way, as when a firewall or NAT box forgets a flow.
Connections opened afterwards are forwarded normally (a new path works),
unless ``silence(new_connections=True)`` made the whole database go silent:
then new connections are accepted and never answered either, until
:meth:`TcpProxy.speak`.
:class:`SilentServer` accepts connections and never says a word (an
unreachable host behind a load balancer, a hung server).
"""

from __future__ import annotations

import selectors
import socket
import threading
from types import TracebackType
from typing import Self

import psycopg
from psycopg.conninfo import make_conninfo

__all__ = ["Address", "SilentServer", "TcpProxy", "server_address"]

#: Where a server listens: ``(host, port)`` over TCP, or the path of a unix socket.
Address = tuple[str, int] | str


def server_address(conninfo: str) -> Address:
    """Where the server of ``conninfo`` listens, as libpq actually reached it."""
    with psycopg.connect(conninfo, connect_timeout=10) as conn:
        host, hostaddr, port = conn.info.host, conn.info.hostaddr, conn.info.port
    if host.startswith("/"):
        return f"{host}/.s.PGSQL.{port}"
    return (hostaddr or host, port)


def _connect(target: Address) -> socket.socket:
    if isinstance(target, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        try:
            sock.connect(target)
        except OSError:
            sock.close()
            raise
        return sock
    return socket.create_connection(target, timeout=5)


class _Service:
    """A background helper used as a context manager: ``start()`` on entry, ``close()`` on exit."""

    def start(self) -> Self:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _Pair:
    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.silent = False

    def close(self) -> None:
        for sock in (self.client, self.upstream):
            try:
                sock.close()
            except OSError:
                pass


class TcpProxy(_Service):
    """Forwards ``127.0.0.1:<port>`` to ``target``; one thread moves all the bytes."""

    def __init__(self, target: Address) -> None:
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._pairs: list[_Pair] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)
        #: Connections accepted so far.
        self.accepted = 0
        # Set by silence(new_connections=True): accepted clients are held, never forwarded.
        self._dark = False
        self._held: list[socket.socket] = []

    def start(self) -> Self:
        self._thread.start()
        return self

    def through(self, conninfo: str) -> str:
        """``conninfo`` with its host and port replaced by this proxy's."""
        return make_conninfo(conninfo, host="127.0.0.1", hostaddr="127.0.0.1", port=str(self.port))

    def silence(self, *, new_connections: bool = False) -> int:
        """Make every connection open now go silent; returns how many were silenced.

        With ``new_connections``, connections opened from now on are accepted
        and never answered too (the whole database is silent) until :meth:`speak`.
        """
        with self._lock:
            pairs = [pair for pair in self._pairs if not pair.silent]
            for pair in pairs:
                pair.silent = True
            if new_connections:
                self._dark = True
        return len(pairs)

    def speak(self) -> None:
        """Forward new connections again (the ones silenced stay silent)."""
        with self._lock:
            self._dark = False

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(5)
        with self._lock:
            for pair in self._pairs:
                pair.close()
            self._pairs.clear()
            for sock in self._held:
                sock.close()
            self._held.clear()
        self._listener.close()
        self._selector.close()

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        with self._lock:
            if self._dark:
                self._held.append(client)
                self.accepted += 1
                return
        try:
            upstream = _connect(self._target)
        except OSError:
            client.close()
            return
        client.setblocking(False)
        upstream.setblocking(False)
        pair = _Pair(client, upstream)
        with self._lock:
            self._pairs.append(pair)
            self.accepted += 1
        self._selector.register(client, selectors.EVENT_READ, (pair, upstream))
        self._selector.register(upstream, selectors.EVENT_READ, (pair, client))

    def _forget(self, pair: _Pair) -> None:
        for sock in (pair.client, pair.upstream):
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
        pair.close()
        with self._lock:
            if pair in self._pairs:
                self._pairs.remove(pair)

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(timeout=0.05):
                if key.data is None:
                    self._accept()
                    continue
                pair, peer = key.data
                if pair.silent:
                    # Stop reading this socket: its bytes pile up unforwarded.
                    try:
                        self._selector.unregister(key.fileobj)
                    except (KeyError, ValueError):
                        pass
                    continue
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self._forget(pair)
                    continue
                try:
                    peer.setblocking(True)
                    peer.sendall(data)
                    peer.setblocking(False)
                except OSError:
                    self._forget(pair)


class SilentServer(_Service):
    """Accepts TCP connections on 127.0.0.1 and never sends a byte."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port: int = self._listener.getsockname()[1]
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="silent-server", daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def _run(self) -> None:
        self._listener.settimeout(0.05)
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._held.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in self._held:
            conn.close()
        self._listener.close()
