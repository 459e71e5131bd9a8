"""Liveness and readiness probes, served with the metrics on one port.

``/healthz`` (alive) is about this process alone and never waits on the
database: every actor of the Runner, cron's included, answers a message
within ``probe_timeout_s`` and every executor thread is running. A stuck
actor (its mailbox not drained) turns it red; one inside a database call
(a statement, its retries) is waiting, not stuck, since restarting would not
bring the database back, and ``/readyz`` reports that. ``/readyz`` (ready for
work): the database answers ``select now()`` within ``db_timeout_s``, and cron (when
the Runner has a crontab) is not more than ``CRON_BEHIND_BOUND_S`` behind
the minute it must handle next. The LISTEN connection is
reported too; while it reconnects the worker finds jobs by polling
(``poll_interval_s``), so it informs but does not fail the probe. Both answer
JSON (``{"status": "ok" | "failing", "checks": {name: {"ok": bool, ...}}}``)
with 200 or 503; ``/metrics`` is Prometheus text.

Start it with ``run(metrics_port=PORT)`` / ``kongtask --metrics-port PORT``,
or mount :func:`wsgi_app` in a host's WSGI server.
"""

from __future__ import annotations

import collections
import errno
import json
import logging
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Self
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import psycopg

from kongtask.db.statements import Queries
from kongtask.errors import ConfigurationError
from kongtask.ops.view import RunnerView
from kongtask.settings import DEFAULT_SCHEMA

__all__ = [
    "CRON_BEHIND_BOUND_S",
    "OpsServer",
    "Probes",
    "wsgi_app",
]

logger = logging.getLogger(__name__)

#: Cron counts as behind when the minute it must handle next is this old (seconds).
CRON_BEHIND_BOUND_S = 120.0
#: Default deadline for the database to answer the readiness query (seconds).
DB_TIMEOUT_S = 2.0
#: Default deadline for every actor to answer the liveness probe (seconds); a
#: healthy actor answers within microseconds, one in a database call is seen at once.
PROBE_TIMEOUT_S = 0.5
# How often the server checks whether its Runner has stopped (then it stops too).
_RUNNER_CHECK_S = 0.2

ConnectionFactory = Callable[[], AbstractContextManager[Any]]
StartResponse = Callable[..., Any]


class _DatabaseCheck:
    """Runs the readiness query on a helper thread, so a silent network cannot hang a probe.

    One query at a time: while an earlier one is still stuck, later probes
    fail at once instead of piling up threads.
    """

    def __init__(self, connect: ConnectionFactory, queries: Queries) -> None:
        self._connect = connect
        self._queries = queries
        self._busy = threading.Lock()

    def __call__(self, timeout_s: float) -> dict[str, Any]:
        if not self._busy.acquire(blocking=False):
            return {"ok": False, "error": "an earlier database check has not returned"}
        outcome: dict[str, Any] = {}
        done = threading.Event()

        def target() -> None:
            started = time.perf_counter()
            try:
                with self._connect() as conn:
                    conn.execute(self._queries.ping).fetchone()
                outcome.update(ok=True, latency_ms=round((time.perf_counter() - started) * 1000, 1))
            except Exception as exc:
                outcome.update(ok=False, error=_one_line(exc))
            finally:
                self._busy.release()
                done.set()

        threading.Thread(target=target, name="kongtask-readyz-db", daemon=True).start()
        if not done.wait(timeout_s):
            return {"ok": False, "error": f"the database did not answer within {timeout_s:g}s"}
        return outcome


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class _StandaloneConnection:
    """One connection kept open between checks and reopened after a failure."""

    def __init__(self, conninfo: str, connect_timeout_s: int) -> None:
        self._conninfo = conninfo
        self._connect_timeout_s = connect_timeout_s
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()

    @contextmanager
    def __call__(self) -> Iterator[psycopg.Connection[Any]]:
        with self._lock:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(
                    self._conninfo,
                    autocommit=True,
                    connect_timeout=self._connect_timeout_s,
                    application_name="kongtask-probe",
                )
            conn = self._conn
            try:
                yield conn
            except BaseException:
                self._conn = None
                conn.close()
                raise

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class Probes:
    """The checks behind ``/healthz`` and ``/readyz``, for a Runner or a database alone."""

    def __init__(
        self,
        *,
        runner: RunnerView | None = None,
        connect: ConnectionFactory | None = None,
        schema: str | None = None,
        metrics: Any = None,
        db_timeout_s: float = DB_TIMEOUT_S,
        probe_timeout_s: float = PROBE_TIMEOUT_S,
    ) -> None:
        if connect is None:
            if runner is None:
                raise ValueError("Probes needs a runner or a connect callable")

            view = runner

            def connect() -> AbstractContextManager[Any]:
                return view.connection(timeout_s=db_timeout_s)

        if schema is None:
            schema = runner.settings.schema if runner is not None else DEFAULT_SCHEMA
        self.runner = runner
        self.metrics = metrics
        self.db_timeout_s = db_timeout_s
        self.probe_timeout_s = probe_timeout_s
        self._database = _DatabaseCheck(connect, Queries(schema))

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Liveness: (ok, checks), from in-process state only (never the database)."""
        runner = self.runner
        if runner is None:
            return True, {"process": {"ok": True}}
        if not runner.running:
            return False, {"runner": {"ok": False, "error": "the worker is not running"}}
        checks: dict[str, Any] = {"runner": {"ok": True, "pool": runner.pool_id}}
        checks.update(runner.probe(self.probe_timeout_s))
        return all(check["ok"] for check in checks.values()), checks

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Readiness: (ok, checks)."""
        checks: dict[str, Any] = {"database": self._database(self.db_timeout_s)}
        runner = self.runner
        if runner is not None:
            if not runner.running:
                checks["runner"] = {"ok": False, "error": "the worker is not running"}
            listening = runner.listening
            if listening is not None:
                checks["listen"] = {
                    "ok": True,
                    "connected": listening,
                    **(
                        {}
                        if listening
                        else {
                            "note": "LISTEN is reconnecting; polling every "
                            f"{runner.settings.poll_interval_s:g}s meanwhile"
                        }
                    ),
                }
            checks.update(self._cron_check(runner))
        return all(check["ok"] for check in checks.values()), checks

    def _cron_check(self, runner: RunnerView) -> dict[str, Any]:
        """Cron is behind when the minute it must handle next is over ``CRON_BEHIND_BOUND_S`` old.

        Measured live from the Runner's Scheduler (so it turns green as soon
        as cron has caught up, whether or not the minutes it caught up on had
        firings); the latest firing lag from the metrics is reported beside it.
        """
        lag = runner.cron_lag_s()
        if lag is None:
            return {}
        behind = lag > CRON_BEHIND_BOUND_S
        check: dict[str, Any] = {"ok": not behind, "lag_s": round(lag, 3)}
        seen = self.metrics.cron_lag_s.get(id(runner)) if self.metrics is not None else None
        if seen is not None:
            check["last_firing_lag_s"] = round(seen[0], 3)
        if behind:
            check["error"] = f"cron is {lag:.0f}s behind its minute"
        return {"cron": check}


def _json_response(
    start_response: StartResponse, ok: bool, checks: dict[str, Any]
) -> Iterable[bytes]:
    body = json.dumps({"status": "ok" if ok else "failing", "checks": checks}).encode()
    start_response(
        "200 OK" if ok else "503 Service Unavailable",
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
        ],
    )
    return [body]


def wsgi_app(
    probes: Probes, metrics: Any = None
) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    """A WSGI app answering ``/healthz``, ``/readyz`` and (with ``metrics``) ``/metrics``."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD")])
            return [b""]
        if path == "/healthz":
            return _json_response(start_response, *probes.health())
        if path == "/readyz":
            return _json_response(start_response, *probes.readiness())
        if path == "/metrics" and metrics is not None:
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            body = generate_latest(metrics.registry)
            start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
            return [body]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics, /healthz or /readyz\n"]

    return app


class QuietHandler(WSGIRequestHandler):
    """Request lines go to kongtask's debug log, not to stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s - %s", self.address_string(), format % args)


class ThreadingWSGIServer(WSGIServer):
    """Serves requests on a bounded set of threads; idle connections hold none.

    An accepted connection waits, without a thread, until its request
    arrives; one that sends nothing for ``idle_timeout_s`` is closed, and past
    ``max_waiting`` waiting connections the oldest is closed. A request is
    then served on one of at most ``max_threads`` threads (more wait their
    turn), each read or write limited to ``idle_timeout_s``, so a stalled
    client cannot hold a thread for long and a flood of idle ones cannot
    starve a scrape or a probe.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    #: Requests served at once, at most (one thread each).
    max_threads = 8
    #: Seconds a connection may stay silent, waiting for its request or within it.
    idle_timeout_s = 5.0
    #: Connections waiting for their request, at most; past it the oldest is closed.
    max_waiting = 512

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._lock = threading.Lock()
        self._incoming: list[tuple[socket.socket, Any]] = []
        self._ready: collections.deque[tuple[socket.socket, Any]] = collections.deque()
        self._busy = 0
        self._closing = threading.Event()
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_write.setblocking(False)
        # Made before binding: a failed bind calls server_close, which looks at it.
        self._watcher = threading.Thread(
            target=self._watch, name="kongtask-http-waiting", daemon=True
        )
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            self._wake_read.close()
            self._wake_write.close()
            raise
        self._watcher.start()

    def process_request(self, request: Any, client_address: Any) -> None:
        """Hand a new connection to the watcher, which waits for its request."""
        with self._lock:
            self._incoming.append((request, client_address))
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_write.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending, or the server is closing

    def _watch(self) -> None:
        """Wait for requests on the connections accepted; close the ones idle too long."""
        waiting: dict[socket.socket, tuple[Any, float]] = {}  # oldest first
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_read, selectors.EVENT_READ)
            while not self._closing.is_set():
                timeout = None
                if waiting:
                    _, first_deadline = next(iter(waiting.values()))
                    timeout = max(0.0, first_deadline - time.monotonic())
                for key, _ in selector.select(timeout):
                    conn = key.fileobj
                    if conn is self._wake_read:
                        self._wake_read.recv(4096)
                        continue
                    assert isinstance(conn, socket.socket)
                    selector.unregister(conn)
                    address, _ = waiting.pop(conn)
                    self._dispatch(conn, address)
                with self._lock:
                    incoming, self._incoming = self._incoming, []
                deadline = time.monotonic() + self.idle_timeout_s
                for conn, address in incoming:
                    try:
                        selector.register(conn, selectors.EVENT_READ)
                    except (OSError, ValueError):  # already closed by the client
                        self.shutdown_request(conn)
                        continue
                    waiting[conn] = (address, deadline)
                now = time.monotonic()
                while waiting:
                    conn, (address, deadline) = next(iter(waiting.items()))
                    if deadline > now and len(waiting) <= self.max_waiting:
                        break
                    selector.unregister(conn)
                    del waiting[conn]
                    logger.debug("Closing an idle connection from %s", address)
                    self.shutdown_request(conn)
            for conn in waiting:
                self.shutdown_request(conn)

    def _dispatch(self, conn: socket.socket, address: Any) -> None:
        """Queue a connection whose request arrived; start a thread if fewer than the bound run."""
        with self._lock:
            self._ready.append((conn, address))
            if self._busy >= self.max_threads:
                return
            self._busy += 1
        threading.Thread(target=self._serve, name="kongtask-http", daemon=True).start()

    def _serve(self) -> None:
        while True:
            with self._lock:
                if not self._ready or self._closing.is_set():
                    self._busy -= 1
                    return
                conn, address = self._ready.popleft()
            try:
                conn.settimeout(self.idle_timeout_s)
                self.finish_request(conn, address)
            except Exception:
                self.handle_error(conn, address)
            finally:
                self.shutdown_request(conn)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away or stalled is logged at debug level, anything else as error."""
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            logger.debug("Connection from %s: %s", client_address, error)
        else:
            logger.error("Serving a request from %s failed", client_address, exc_info=True)

    def server_close(self) -> None:
        """Close the socket, the waiting connections and the queued ones."""
        self._closing.set()
        self._wake()
        if self._watcher.is_alive() and self._watcher is not threading.current_thread():
            self._watcher.join(5.0)
        with self._lock:
            pending = [conn for conn, _ in self._incoming] + [conn for conn, _ in self._ready]
            self._incoming.clear()
            self._ready.clear()
        for conn in pending:
            self.shutdown_request(conn)
        super().server_close()
        self._wake_read.close()
        self._wake_write.close()


class OpsServer:
    """An HTTP server for ``/metrics``, ``/healthz`` and ``/readyz`` on its own thread."""

    def __init__(
        self,
        app: Callable[[dict[str, Any], StartResponse], Iterable[bytes]],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        self._app = app
        self._host = host
        self._port = port
        self._on_stop = on_stop
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    @classmethod
    def for_runner(
        cls,
        runner: RunnerView,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        depth_max_tasks: int | None = None,
    ) -> OpsServer:
        """The server for one Runner: its metrics and probes; it stops when the Runner stops.

        ``depth_max_tasks``: see :class:`kongtask.ops.metrics.Metrics` (default 100).
        """
        from kongtask.ops.metrics import DEPTH_MAX_TASKS, Metrics

        def connect() -> AbstractContextManager[Any]:
            return runner.connection(timeout_s=DB_TIMEOUT_S)

        metrics = Metrics(
            connect=connect,
            schema=runner.settings.schema,
            depth_max_tasks=DEPTH_MAX_TASKS if depth_max_tasks is None else depth_max_tasks,
        )
        metrics.attach(runner)
        probes = Probes(runner=runner, metrics=metrics)
        server = cls(wsgi_app(probes, metrics), host=host, port=port, on_stop=metrics.detach)
        server.metrics = metrics
        server.probes = probes
        server._runner = runner
        return server

    @classmethod
    def for_database(
        cls,
        conninfo: str,
        *,
        schema: str,
        host: str = "127.0.0.1",
        port: int = 0,
        depth_max_tasks: int | None = None,
    ) -> OpsServer:
        """The server for a database alone (no Runner): queue depth and readiness."""
        from kongtask.ops.metrics import DEPTH_MAX_TASKS, Metrics

        connection = _StandaloneConnection(conninfo, connect_timeout_s=int(max(2, DB_TIMEOUT_S)))
        metrics = Metrics(
            connect=connection,
            schema=schema,
            depth_max_tasks=DEPTH_MAX_TASKS if depth_max_tasks is None else depth_max_tasks,
        )
        probes = Probes(connect=connection, schema=schema, metrics=metrics)
        server = cls(wsgi_app(probes, metrics), host=host, port=port, on_stop=connection.close)
        server.metrics = metrics
        server.probes = probes
        return server

    metrics: Any = None
    probes: Any = None
    _runner: RunnerView | None = None

    @property
    def port(self) -> int:
        """The port listened on (useful with port 0)."""
        assert self._server is not None, "the server is not started"
        return int(self._server.server_port)

    @property
    def url(self) -> str:
        """``http://host:port``."""
        return f"http://{self._host}:{self.port}"

    def bind(self) -> Self:
        """Take the address now, before anything connects; :meth:`start` then serves on it.

        A taken or unusable address raises :class:`ConfigurationError` naming
        the port (or the host), so a worker fails before it touches the database.
        """
        if self._server is not None:
            return self
        try:
            self._server = make_server(
                self._host,
                self._port,
                self._app,
                server_class=ThreadingWSGIServer,
                handler_class=QuietHandler,
            )
        except OSError as exc:
            reason = (exc.strerror or str(exc) or type(exc).__name__).lower()
            if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
                raise ConfigurationError(
                    f"metrics_host {self._host!r}: {reason}", name="metrics_host", value=self._host
                ) from None
            raise ConfigurationError(
                f"metrics_port {self._port}: {reason} (host {self._host})",
                name="metrics_port",
                value=self._port,
            ) from None
        return self

    def start(self) -> Self:
        """Bind (unless :meth:`bind` did) and serve in the background; stops by itself
        when its Runner stops."""
        self.bind()
        assert self._server is not None
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name=f"kongtask-ops-{self.port}",
            daemon=True,
        )
        self._thread.start()
        logger.info("Serving /metrics, /healthz and /readyz on %s", self.url)
        runner = self._runner
        if runner is not None:
            threading.Thread(
                target=self._stop_with,
                args=(runner,),
                daemon=True,
                name="kongtask-ops-watch",
            ).start()
        return self

    def _stop_with(self, runner: RunnerView) -> None:
        while runner.running:
            if self._stopped.wait(_RUNNER_CHECK_S):
                return
        self.stop()

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        server = self._server
        if server is not None:
            if self._thread is not None:  # shutdown() waits for a serve loop that never ran
                server.shutdown()
            server.server_close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        if self._on_stop is not None:
            self._on_stop()

    def __enter__(self) -> Self:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
