"""Liveness and readiness probes, served with the metrics on one port.

``/healthz`` (alive): every actor of the Runner answers a message within
``probe_timeout_s`` and every executor thread is running; a stuck actor (its
mailbox not drained) turns it red, except an actor retrying a statement
while the database itself does not answer (restarting would not help; that
is what ``/readyz`` reports). ``/readyz`` (ready for work): the
database answers ``select now()`` within ``db_timeout_s``, and cron (when
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

import errno
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Self
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import psycopg

from .errors import ConfigurationError
from .settings import DEFAULT_SCHEMA
from .sql import Queries

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
#: Default deadline for every actor to answer the liveness probe (seconds).
PROBE_TIMEOUT_S = 2.0

#: Actors that wait on the database while retrying; silent only counts if it answers.
_DATABASE_ACTORS = frozenset({"claimer", "completer", "sweeper", "cron:CronWriter"})

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
        runner: Any = None,
        connect: ConnectionFactory | None = None,
        schema: str | None = None,
        metrics: Any = None,
        db_timeout_s: float = DB_TIMEOUT_S,
        probe_timeout_s: float = PROBE_TIMEOUT_S,
    ) -> None:
        if connect is None:
            if runner is None:
                raise ValueError("Probes needs a runner or a connect callable")

            def connect() -> AbstractContextManager[Any]:
                manager: AbstractContextManager[Any] = runner.connection(timeout_s=db_timeout_s)
                return manager

        if schema is None:
            schema = runner.settings.schema if runner is not None else DEFAULT_SCHEMA
        self.runner = runner
        self.metrics = metrics
        self.db_timeout_s = db_timeout_s
        self.probe_timeout_s = probe_timeout_s
        self._database = _DatabaseCheck(connect, Queries(schema))

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Liveness: (ok, checks)."""
        runner = self.runner
        if runner is None:
            return True, {"process": {"ok": True}}
        if not runner.running:
            return False, {"runner": {"ok": False, "error": "the worker is not running"}}
        checks: dict[str, Any] = {"runner": {"ok": True, "pool": runner.pool_id}}
        silent_db_actors = []
        for name, problem in runner.probe(self.probe_timeout_s).items():
            checks[name] = {"ok": True} if problem is None else {"ok": False, "error": problem}
            if problem is not None and name in _DATABASE_ACTORS:
                silent_db_actors.append(name)
        if silent_db_actors and not self._database(self.db_timeout_s)["ok"]:
            # Retrying a statement while the database is away is not being stuck:
            # restarting the process would not help (readiness reports the outage).
            for name in silent_db_actors:
                checks[name] = {"ok": True, "waiting": "for the database (see /readyz)"}
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

    def _cron_check(self, runner: Any) -> dict[str, Any]:
        """Cron is behind when the minute it must handle next is over ``CRON_BEHIND_BOUND_S`` old.

        Measured live from the Runner's Scheduler (so it turns green as soon
        as cron has caught up, whether or not the minutes it caught up on had
        firings); the latest firing lag from the metrics is reported beside it.
        """
        supervisor = getattr(runner, "_supervisor", None)
        scheduler = getattr(supervisor, "cron", None)
        lag = scheduler.lag_s() if scheduler is not None else None
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
    """One thread per request, so a slow probe never blocks a scrape."""

    daemon_threads = True
    allow_reuse_address = True

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(target=self._handle, args=(request, client_address), daemon=True)
        thread.start()

    def _handle(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)


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
    def for_runner(cls, runner: Any, *, host: str = "127.0.0.1", port: int = 0) -> OpsServer:
        """The server for one Runner: its metrics and probes; it stops when the Runner stops."""
        from .metrics import Metrics

        def connect() -> AbstractContextManager[Any]:
            manager: AbstractContextManager[Any] = runner.connection(timeout_s=DB_TIMEOUT_S)
            return manager

        metrics = Metrics(connect=connect, schema=runner.settings.schema)
        metrics.attach(runner)
        probes = Probes(runner=runner, metrics=metrics)
        server = cls(wsgi_app(probes, metrics), host=host, port=port, on_stop=metrics.detach)
        server.metrics = metrics
        server.probes = probes
        server._runner = runner
        return server

    @classmethod
    def for_database(
        cls, conninfo: str, *, schema: str, host: str = "127.0.0.1", port: int = 0
    ) -> OpsServer:
        """The server for a database alone (no Runner): queue depth and readiness."""
        from .metrics import Metrics

        connection = _StandaloneConnection(conninfo, connect_timeout_s=int(max(2, DB_TIMEOUT_S)))
        metrics = Metrics(connect=connection, schema=schema)
        probes = Probes(connect=connection, schema=schema, metrics=metrics)
        server = cls(wsgi_app(probes, metrics), host=host, port=port, on_stop=connection.close)
        server.metrics = metrics
        server.probes = probes
        return server

    metrics: Any = None
    probes: Any = None
    _runner: Any = None

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
        supervisor = getattr(runner, "_supervisor", None)
        if supervisor is not None:
            threading.Thread(
                target=self._stop_with,
                args=(supervisor.done,),
                daemon=True,
                name="kongtask-ops-watch",
            ).start()
        return self

    def _stop_with(self, done: threading.Event) -> None:
        while not done.wait(1.0):
            if self._stopped.is_set():
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
