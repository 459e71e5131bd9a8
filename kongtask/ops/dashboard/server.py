"""Running the dashboard on its own HTTP server (what ``kongtask dashboard`` does).

It listens on 127.0.0.1 unless told otherwise, and refuses any other address
without a token: the dashboard can fail and remove jobs, so it must not be
open to a network by accident. Requests are served on their own threads (at
most :data:`MAX_REQUEST_THREADS` at once), and the request log never shows
the token.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
from collections.abc import Sequence
from typing import Any, Self
from urllib.parse import quote, unquote_plus
from wsgiref.simple_server import make_server

from kongtask.cron.types import ParsedCronItem
from kongtask.db.conninfo import REDACTED
from kongtask.errors import ConfigurationError
from kongtask.ops.dashboard.app import STATEMENT_TIMEOUT_S, Dashboard
from kongtask.ops.health import QuietHandler, ThreadingWSGIServer
from kongtask.validate import check_seconds

__all__ = [
    "MAX_REQUEST_THREADS",
    "SAMPLE_INTERVAL_S",
    "DashboardServer",
    "hide_token",
    "is_loopback",
    "serve",
]

logger = logging.getLogger(__name__)

#: How often the server samples the jobs table's deletion counter for the chart.
SAMPLE_INTERVAL_S = 15.0
#: Requests served at once; further connections wait in the listen backlog.
MAX_REQUEST_THREADS = 16

# One query parameter (name=value) in a URL, as it appears quoted in a log line.
_QUERY_PARAMETER = re.compile(r"(?P<head>[?&](?P<name>[^=&\s'\"#]*)=)(?P<value>[^&\s'\"#]*)")


def hide_token(text: str, token: str | None = None) -> str:
    """``text`` with the value of every ``token`` query parameter (and ``token`` itself) hidden.

    The name is compared decoded, as the dashboard reads it (``%74oken`` is
    ``token`` too); a wrong token is hidden as well, since it may be a typo of
    the right one.
    """

    def hide(match: re.Match[str]) -> str:
        if unquote_plus(match["name"]).strip().lower() != "token":
            return match[0]
        return match["head"] + REDACTED

    text = _QUERY_PARAMETER.sub(hide, text)
    if token:
        text = text.replace(token, REDACTED).replace(quote(token, safe=""), REDACTED)
    return text


class _RequestLog(QuietHandler):
    """Request lines (and the server's errors about a request) to the debug log, token hidden."""

    server: _DashboardHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        message = hide_token(format % args, self.server.token)
        logger.debug("%s - %s", self.address_string(), message)


class _DashboardHTTPServer(ThreadingWSGIServer):
    """The ops server's bounded threads, with more of them: a page may wait for its deadline."""

    max_threads = MAX_REQUEST_THREADS
    #: The dashboard's token, hidden wherever it appears in the request log.
    token: str | None = None


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class DashboardServer:
    """The dashboard app on a threaded WSGI server, with a sampler for the chart."""

    def __init__(
        self,
        connection_string: str | None = None,
        *,
        schema: str | None = None,
        host: str = "127.0.0.1",
        port: int = 8000,
        token: str | None = None,
        cron_items: Sequence[ParsedCronItem] = (),
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
        check_seconds("statement_timeout_s", statement_timeout_s, allow_minimum=False)
        self._statement_timeout_s = statement_timeout_s
        self.app: Dashboard | None = None
        self._server: _DashboardHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()

    @property
    def port(self) -> int:
        """The port listened on."""
        assert self._server is not None, "not started"
        return int(self._server.server_port)

    @property
    def url(self) -> str:
        """The dashboard's address."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}/"

    def start(self) -> Self:
        """Connect, bind and serve in the background."""
        server = make_server(
            self._host,
            self._port,
            lambda environ, start: self._app()(environ, start),
            server_class=_DashboardHTTPServer,
            handler_class=_RequestLog,
        )
        server.token = self._token
        self._server = server
        names = {self._host.lower(), "localhost" if is_loopback(self._host) else self._host}
        if is_loopback(self._host):
            names |= {"127.0.0.1", "[::1]"}
        allowed = {f"{name}:{self.port}" for name in names}
        self.app = Dashboard(
            self._connection_string,
            schema=self._schema,
            cron_items=self._cron_items,
            token=self._token,
            allowed_hosts=None if self._host in ("0.0.0.0", "::") else allowed,
            statement_timeout_s=self._statement_timeout_s,
        )
        self.app.open()  # connect (and migrate) now, so a bad URL fails the start
        self.app.sample()
        for target, name in (
            (lambda: server.serve_forever(poll_interval=0.2), "kongtask-dashboard"),
            (self._sample_loop, "kongtask-dashboard-sampler"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        logger.info("Dashboard on %s", self.url)
        return self

    def _app(self) -> Dashboard:
        assert self.app is not None
        return self.app

    def _sample_loop(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            try:
                self._app().sample()
            except Exception as exc:
                logger.warning("Dashboard: sampling the throughput failed: %s", exc)

    def stop(self) -> None:
        """Stop serving and close the database connection."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for thread in self._threads:
            thread.join(5.0)
        if self.app is not None:
            self.app.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(connection_string: str | None = None, **options: object) -> DashboardServer:
    """Start a :class:`DashboardServer` (same options) and return it."""
    return DashboardServer(connection_string, **options).start()  # type: ignore[arg-type]
