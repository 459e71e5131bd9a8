"""Running the dashboard on its own HTTP server (what ``kongtask dashboard`` does).

It listens on 127.0.0.1 unless told otherwise, and refuses any other address
without a token: the dashboard can fail and remove jobs, so it must not be
open to a network by accident.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Sequence
from typing import Self
from wsgiref.simple_server import WSGIServer, make_server

from kongtask.cron.types import ParsedCronItem
from kongtask.errors import ConfigurationError
from kongtask.health import QuietHandler, ThreadingWSGIServer

from .app import Dashboard

__all__ = ["SAMPLE_INTERVAL_S", "DashboardServer", "is_loopback", "serve"]

logger = logging.getLogger(__name__)

#: How often the server samples the jobs table's deletion counter for the chart.
SAMPLE_INTERVAL_S = 15.0


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
        self.app: Dashboard | None = None
        self._server: WSGIServer | None = None
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
            server_class=ThreadingWSGIServer,
            handler_class=QuietHandler,
        )
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
        )
        self.app.utils()  # connect (and migrate) now, so a bad URL fails the start
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
