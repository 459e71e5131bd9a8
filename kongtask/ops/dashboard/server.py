"""Running the dashboard on uvicorn (what ``kongtask dashboard`` does).

It listens on 127.0.0.1 unless told otherwise, and refuses any other address
without a token: the dashboard can fail and remove jobs, so it must not be
open to a network by accident. The request log (the app's own, at debug
level) never shows the token, and uvicorn's messages pass through the same
filter.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Sequence
from typing import Self

import uvicorn

from kongtask.cron.types import ParsedCronItem
from kongtask.errors import ConfigurationError
from kongtask.ops.dashboard.app import STATEMENT_TIMEOUT_S, Dashboard
from kongtask.ops.dashboard.logs import hide_token
from kongtask.validate import check_seconds

__all__ = [
    "DashboardServer",
    "hide_token",
    "is_loopback",
    "serve",
]

logger = logging.getLogger(__name__)

#: How long stopping waits for open requests (live-update streams end at once).
_SHUTDOWN_GRACE_S = 2
_STARTUP_TIMEOUT_S = 10.0


class _HideToken(logging.Filter):
    """Rewrites uvicorn's records so the token never reaches a handler."""

    def __init__(self, token: str | None) -> None:
        super().__init__()
        self.token = token

    def filter(self, record: logging.LogRecord) -> bool:
        message = hide_token(record.getMessage(), self.token)
        record.msg, record.args = message, None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = hide_token(
                logging.Formatter().formatException(record.exc_info), self.token
            )
            record.exc_info = None
        return True


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class DashboardServer:
    """The dashboard app on uvicorn in a background thread."""

    def __init__(
        self,
        connection_string: str | None = None,
        *,
        schema: str | None = None,
        host: str = "127.0.0.1",
        port: int = 8000,
        token: str | None = None,
        cron_items: Sequence[ParsedCronItem] = (),
        cron_lines: dict[str, str] | None = None,
        statement_timeout_s: float = STATEMENT_TIMEOUT_S,
    ) -> None:
        if not is_loopback(host) and not token:
            raise ConfigurationError(
                f"refusing to serve the dashboard on {host!r} without a token: anyone who can "
                "reach it could fail or remove jobs. Pass --token (or listen on 127.0.0.1)",
                name="--host",
                value=host,
            )
        self._connection_string = connection_string
        self._schema = schema
        self._host = host
        self._port = port
        self._token = token
        self._cron_items = list(cron_items)
        self._cron_lines = dict(cron_lines or {})
        check_seconds("statement_timeout_s", statement_timeout_s, allow_minimum=False)
        self._statement_timeout_s = statement_timeout_s
        self.app: Dashboard | None = None
        self._server: uvicorn.Server | None = None
        self._socket: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._filter = _HideToken(token)

    @property
    def port(self) -> int:
        """The port listened on."""
        assert self._socket is not None, "not started"
        return int(self._socket.getsockname()[1])

    @property
    def url(self) -> str:
        """The dashboard's address."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}/"

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self._host.strip("[]"), self._port))
            sock.listen(128)
            sock.set_inheritable(True)
        except OSError:
            sock.close()
            raise
        return sock

    def start(self) -> Self:
        """Connect, bind and serve in the background."""
        self._socket = self._bind()
        names = {self._host.lower(), "localhost" if is_loopback(self._host) else self._host}
        if is_loopback(self._host):
            names |= {"127.0.0.1", "[::1]"}
        allowed = {f"{name}:{self.port}" for name in names}
        app = Dashboard(
            self._connection_string,
            schema=self._schema,
            cron_items=self._cron_items,
            cron_lines=self._cron_lines,
            token=self._token,
            allowed_hosts=None if self._host in ("0.0.0.0", "::") else allowed,
            statement_timeout_s=self._statement_timeout_s,
        )
        self.app = app
        try:
            app.open()  # connect (and migrate) now, so a bad URL fails the start
        except BaseException:
            self._socket.close()
            app.close()
            raise
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
            logging.getLogger(name).addFilter(self._filter)
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="off",
            server_header=False,
            timeout_graceful_shutdown=_SHUTDOWN_GRACE_S,
        )
        server = uvicorn.Server(config)
        self._server = server
        sock = self._socket
        thread = threading.Thread(
            target=lambda: server.run(sockets=[sock]), name="kongtask-dashboard", daemon=True
        )
        thread.start()
        self._threads.append(thread)
        waiting = threading.Event()
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        while not server.started and self._threads[0].is_alive() and time.monotonic() < deadline:
            waiting.wait(0.02)
        if not server.started:
            self.stop()
            raise ConfigurationError("the dashboard's server did not start; see the log")
        logger.info("Dashboard on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop serving and close the database connection."""
        if self._server is not None:
            self._server.should_exit = True
        for thread in self._threads:
            thread.join(_SHUTDOWN_GRACE_S + 5.0)
        if self.app is not None:
            self.app.close()
        if self._socket is not None:
            self._socket.close()
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
            logging.getLogger(name).removeFilter(self._filter)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(connection_string: str | None = None, **options: object) -> DashboardServer:
    """Start a :class:`DashboardServer` (same options) and return it."""
    return DashboardServer(connection_string, **options).start()  # type: ignore[arg-type]
