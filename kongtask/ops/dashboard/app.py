"""The dashboard as an ASGI application: Starlette routing, Jinja2 pages, POST actions.

``Dashboard(...)`` is the ASGI app: mount it in Starlette or FastAPI
(``app.mount("/kongtask", dashboard)``), hand :meth:`Dashboard.wsgi` to a
WSGI host (Flask, Django), or run ``kongtask dashboard`` (uvicorn).

Security, since the pages can change jobs:

- every action is a POST carrying a per-process CSRF token twice, in a hidden
  form field and in a ``SameSite=Strict`` cookie, compared in constant time;
  and its ``Origin`` (or ``Referer``) must name the host the request was sent
  to, so another site can neither forge nor replay a form;
- with ``allowed_hosts`` (``kongtask dashboard`` sets it to the address it
  listens on) other ``Host`` headers are refused, which defeats DNS rebinding;
- with ``token`` every request must carry it (a ``kongtask_token`` cookie set
  by visiting ``/?token=T`` once, or ``Authorization: Bearer T``);
- a redirect goes only to a path on the dashboard's own site
  (:func:`same_origin_path`), whatever a form's ``next`` says;
- pages forbid framing and load nothing from elsewhere (CSP: scripts and
  event streams from the dashboard itself only);
- templates escape every value (Jinja2 autoescaping).

Each request borrows one connection from a small pool and waits for the
database ``statement_timeout_s`` at most, so a locked table makes the pages
that read it answer 503 after the deadline while other requests are served.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from typing import Any, Self
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import psycopg
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup
from psycopg import errors as pg_errors
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kongtask.cron.schedule import job_spec
from kongtask.cron.types import ParsedCronItem
from kongtask.db.connecting import (
    DEFAULT_CONNECTION_SETTINGS,
    DeadlineExceeded,
    connect,
    open_pool,
)
from kongtask.db.conninfo import open_database, resolve_schema
from kongtask.db.migrate import migrate
from kongtask.db.statements import Queries
from kongtask.errors import KongtaskError
from kongtask.ops.cli.admin import find_dead_pools
from kongtask.ops.cli.jobs import parse_time
from kongtask.ops.dashboard import views
from kongtask.ops.dashboard.chart import floor_minute, render_chart, task_throughput
from kongtask.ops.dashboard.logs import hide_token
from kongtask.ops.status import (
    JOB_STATES,
    search_jobs,
    unserved_tasks,
)
from kongtask.validate import check_seconds
from kongtask.worker_utils import WorkerUtils

__all__ = [
    "BULK_LIMIT",
    "PAGE_SIZE",
    "POOL_SIZE",
    "STATEMENT_TIMEOUT_S",
    "Dashboard",
    "same_origin_path",
    "source_lines",
]

logger = logging.getLogger(__name__)

_CSRF_COOKIE = "kongtask_csrf"
_TOKEN_COOKIE = "kongtask_token"
_MAX_FORM_BYTES = 64 * 1024
_MAX_JOB_ID = 2**63 - 1  # job ids are bigints
_MAX_FLASHES = 256
_FAILING_LIMIT = 50
_RUNNING_LIMIT = 500
_CRON_HISTORY_LIMIT = 100
_CRASH_LIMIT = 200
_CHARTED_TASKS = 8  # the busiest tasks get a chart each
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; connect-src 'self'; "
        "style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

#: How long a page waits for the database: for a pooled connection, then for each statement.
STATEMENT_TIMEOUT_S = 5.0
#: Connections the dashboard keeps open at most.
POOL_SIZE = 4
#: Jobs on one page of the job list.
PAGE_SIZE = 50
#: Jobs a bulk action on a filter changes at most (the confirmation says so when more match).
BULK_LIMIT = 10_000
#: Seconds between two live updates of a page.
LIVE_INTERVAL_S = 5.0
#: The client-side deadline's lead over the server's statement_timeout: it only
#: fires when the server went silent (the server cancels a slow statement itself).
_SILENT_SERVER_MARGIN_S = 2.0
#: How long opening the pool may wait for its first connection.
_POOL_OPEN_TIMEOUT_S = 10.0
_BULK_ACTIONS = {"retry": "Retry", "fail": "Fail", "remove": "Remove", "reschedule": "Reschedule"}


class _Refused(Exception):
    """A request the dashboard will not serve: (status code, message)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _HeldConnection(WorkerUtils):
    """WorkerUtils over one connection its caller holds (a request's pooled connection)."""

    def __init__(self, conn: psycopg.Connection[Any], schema: str) -> None:
        super().__init__(schema=schema, migrate_on_open=False)
        self._held = conn

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """The held connection, exclusively for the ``with`` block."""
        with self._lock:
            yield self._held


def _plain(status: int, text: str) -> Response:
    return PlainTextResponse(text + "\n", status_code=status)


class _Guard:
    """Around every request: Host and token checks, security headers, errors, the request log."""

    def __init__(self, app: ASGIApp, dashboard: Dashboard) -> None:
        self.app = app
        self.dashboard = dashboard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started: dict[str, int] = {"size": 0}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.body":
                started["size"] += len(message.get("body", b""))
            elif message["type"] == "http.response.start":
                started["status"] = message["status"]
                headers = MutableHeaders(scope=message)
                for name, value in _SECURITY_HEADERS.items():
                    headers[name] = value
            await send(message)

        try:
            early = self.dashboard.check_request(Request(scope))
            if early is not None:
                await early(scope, receive, send_with_headers)
            else:
                await self.app(scope, receive, send_with_headers)
        except Exception as exc:
            if "status" in started:
                raise
            await self.dashboard.failure(scope, exc)(scope, receive, send_with_headers)
        finally:
            _log_request(scope, started.get("status", 0), started["size"], self.dashboard.token)


def _log_request(scope: Scope, status: int, size: int, token: str | None) -> None:
    """One debug line per request, as a server's access log has it, the token hidden."""
    if not logger.isEnabledFor(logging.DEBUG):
        return
    target = scope.get("raw_path") or scope["path"].encode()
    query = scope.get("query_string") or b""
    text = target.decode("latin-1") + (("?" + query.decode("latin-1")) if query else "")
    client = scope.get("client") or ("-", 0)
    logger.debug(
        "%s - %s",
        client[0],
        hide_token(
            f'"{scope["method"]} {text} HTTP/{scope.get("http_version", "1.1")}" {status} {size}',
            token,
        ),
    )


class Dashboard:
    """The dashboard ASGI app over one database (``connection_string`` as everywhere else).

    ``statement_timeout_s`` bounds a request's wait for a pooled connection
    together with each of its statements; past it the page answers 503.
    ``stream_s`` is how long one live-update stream lasts before the browser
    reconnects (0: one update per request, for WSGI hosts).
    """

    def __init__(
        self,
        connection_string: str | None = None,
        *,
        schema: str | None = None,
        cron_items: Sequence[ParsedCronItem] = (),
        cron_lines: dict[str, str] | None = None,
        token: str | None = None,
        allowed_hosts: Iterable[str] | None = None,
        statement_timeout_s: float = STATEMENT_TIMEOUT_S,
        stream_s: float = 60.0,
    ) -> None:
        if token is not None and (not isinstance(token, str) or len(token) < 8):
            raise KongtaskError("the dashboard token must be a string of at least 8 characters")
        check_seconds("statement_timeout_s", statement_timeout_s, allow_minimum=False)
        check_seconds("stream_s", stream_s)
        self._statement_timeout_s = float(statement_timeout_s)
        self._stream_s = float(stream_s)
        self._connection_string = connection_string
        self._schema = schema
        self._cron_items = list(cron_items)
        self._cron_lines = dict(cron_lines or {})
        self.token = token
        self._allowed_hosts = (
            {host.lower() for host in allowed_hosts} if allowed_hosts is not None else None
        )
        self.csrf_token = secrets.token_urlsafe(32)
        self._pool: ConnectionPool[Any] | None = None
        self._pool_lock = threading.Lock()
        self._stack: ExitStack | None = None
        self._schema_name = ""  # resolved when the pool opens
        self._flashes: OrderedDict[str, tuple[bool, str]] = OrderedDict()
        self._flash_lock = threading.Lock()
        self._closing = threading.Event()
        self._templates = Environment(
            loader=PackageLoader("kongtask.ops.dashboard", "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self._templates.filters.update(
            when=views.when, duration=views.duration, pretty=views.pretty, firstline=views.firstline
        )
        self._app = Starlette(
            routes=[
                Route("/", self._overview_page),
                Route("/healthz", self._healthz),
                Route("/events", self._events),
                Route("/jobs", self._jobs_page),
                Route("/jobs/{job_id:str}", self._job_page),
                Route("/running", self._running_page),
                Route("/cron", self._cron_page),
                Route("/cron/{identifier:str}", self._cron_item_page),
                Route("/crashes", self._crashes_page),
                Route("/limits", self._limits_page),
                Route("/actions/bulk", self._bulk, methods=["POST"]),
                Route("/actions/{name:str}", self._action, methods=["POST"]),
                _static_mount(),
            ],
            middleware=[Middleware(_Guard, dashboard=self)],
        )
        self._app.router.redirect_slashes = False  # "/jobs/" is no page, not a redirect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)

    def wsgi(self) -> Any:
        """This dashboard as a WSGI app (for Flask, Django): each live update is one request."""
        from a2wsgi import ASGIMiddleware

        self._stream_s = 0.0
        return ASGIMiddleware(self)  # type: ignore[arg-type]

    # --- the database -------------------------------------------------------------

    def open(self) -> Self:
        """Migrate the schema and open the connection pool (else the first request does)."""
        self._opened_pool()
        return self

    def _opened_pool(self) -> ConnectionPool[Any]:
        with self._pool_lock:
            if self._pool is None:
                self._pool = self._open_pool()
            return self._pool

    def _open_pool(self) -> ConnectionPool[Any]:
        settings = DEFAULT_CONNECTION_SETTINGS
        schema = resolve_schema(self._schema)
        with ExitStack() as stack:
            conninfo = stack.enter_context(open_database(self._connection_string))
            with connect(conninfo, settings) as conn:
                migrate(conn, schema)
            pool = open_pool(
                conninfo,
                settings,
                name="kongtask-dashboard",
                min_size=1,
                max_size=POOL_SIZE,
                deadline_s=self._statement_timeout_s + _SILENT_SERVER_MARGIN_S,
                open_timeout_s=_POOL_OPEN_TIMEOUT_S,
            )
            stack.callback(pool.close)
            self._stack = stack.pop_all()
        self._schema_name = schema
        return pool

    @contextmanager
    def database(self) -> Iterator[WorkerUtils]:
        """WorkerUtils over one pooled connection, its waits within ``statement_timeout_s``.

        Waiting for a free connection counts: what is left of the deadline
        becomes the connection's ``statement_timeout``, which the server also
        applies to a wait for a lock (and leaves the connection usable). The
        client-side deadline, a little later, covers a server gone silent.
        """
        pool = self._opened_pool()
        started = time.monotonic()
        with pool.connection(timeout=self._statement_timeout_s) as conn:
            left_s = max(self._statement_timeout_s - (time.monotonic() - started), 0.001)
            conn.deadline_s = left_s + _SILENT_SERVER_MARGIN_S
            milliseconds = max(1, round(left_s * 1000))  # 0 would mean no timeout
            conn.execute(
                Queries(self._schema_name).set_statement_timeout, {"timeout": f"{milliseconds}ms"}
            )
            yield _HeldConnection(conn, self._schema_name)

    def close(self) -> None:
        """Close the connection pool and end the live-update streams."""
        self._closing.set()
        with self._pool_lock:
            stack, self._stack, self._pool = self._stack, None, None
        if stack is not None:
            stack.close()

    # --- every request ---------------------------------------------------------------

    def check_request(self, request: Request) -> Response | None:
        """Refuse a request from an unexpected Host or without the token; a login redirect."""
        if self._allowed_hosts is not None:
            host = request.headers.get("host", "").lower()
            if host not in self._allowed_hosts:
                raise _Refused(421, f"unexpected Host header: {host!r}")
        token = self.token
        if token is None:
            return None
        given = request.query_params.get("token")
        if given is not None and request.method == "GET":
            if not hmac.compare_digest(given.encode(), token.encode()):
                raise _Refused(403, "wrong token")
            base = _base(request)
            # The path arrives percent-decoded: encode it again, so a decoded
            # CR/LF or "//" cannot reach the Location header.
            path = quote(request.scope["path"].encode("utf-8", "replace"))
            response = RedirectResponse(same_origin_path(path, quote(base) + "/"), status_code=303)
            self._set_cookies(response, token_cookie=True)
            return response
        header = request.headers.get("authorization", "")
        if header.startswith("Bearer ") and hmac.compare_digest(
            header[7:].encode(), token.encode()
        ):
            return None
        cookie = request.cookies.get(_TOKEN_COOKIE)
        if cookie is not None and hmac.compare_digest(cookie.encode(), token.encode()):
            return None
        raise _Refused(401, "This dashboard needs its token: open it once as /?token=TOKEN")

    def failure(self, scope: Scope, exc: Exception) -> Response:
        """The plain answer to a request that failed with ``exc`` (details only in the log)."""
        if isinstance(exc, _Refused):
            return _plain(exc.status, str(exc))
        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError | PoolTimeout):
            logger.warning("Dashboard: database unavailable: %s", exc)
            if isinstance(exc, pg_errors.QueryCanceled | DeadlineExceeded | PoolTimeout):
                return _plain(
                    503,
                    f"The database did not answer within {self._statement_timeout_s:g} s "
                    "(a locked table or a long query?); retry.",
                )
            return _plain(503, "The database is unavailable; retry.")
        # The path without its query, which may hold the token.
        logger.exception(
            "Dashboard: %s %s failed", scope.get("method"), quote(str(scope.get("path", "")))
        )
        return _plain(500, "Internal error; see the log.")

    def _set_cookies(self, response: Response, *, token_cookie: bool = False) -> None:
        response.set_cookie(
            _CSRF_COOKIE, self.csrf_token, path="/", samesite="strict", httponly=True
        )
        if token_cookie and self.token is not None:
            response.set_cookie(
                _TOKEN_COOKIE, self.token, path="/", samesite="strict", httponly=True
            )

    # --- pages ---------------------------------------------------------------------

    async def _healthz(self, request: Request) -> Response:
        return _plain(200, "ok")

    def _render(
        self, request: Request, utils: WorkerUtils, template: str, **context: Any
    ) -> Response:
        base = _base(request)
        flash = None
        with self._flash_lock:
            found = self._flashes.pop(request.query_params.get("flash", ""), None)
        if found is not None:
            flash = {"ok": found[0], "text": found[1]}
        page = self._templates.get_template(template).render(
            base=base,
            csrf=self.csrf_token,
            back=_strip_flash(request),
            schema=utils.schema,
            now=datetime.now(UTC),
            flash=flash,
            states=JOB_STATES,
            path=request.url.path[len(base) :] or "/",
            **context,
        )
        response = HTMLResponse(page)
        self._set_cookies(response)
        return response

    def _page(
        self, request: Request, build: Callable[[WorkerUtils], tuple[str, dict[str, Any]]]
    ) -> Awaitable[Response]:
        def run() -> Response:
            with self.database() as utils:
                template, context = build(utils)
                return self._render(request, utils, template, **context)

        return run_in_threadpool(run)

    async def _overview_page(self, request: Request) -> Response:
        def build(utils: WorkerUtils) -> tuple[str, dict[str, Any]]:
            report = utils.status(cron_items=self._cron_items)
            with utils.connection() as conn:
                with conn.cursor(row_factory=dict_row) as cursor:
                    stats = cursor.execute(Queries(utils.schema).dashboard_task_stats).fetchall()

                dead_locks = find_dead_pools(conn, utils.schema)
                unserved = unserved_tasks(conn, Queries(utils.schema))
            failing = sorted(
                utils.list_jobs(state="retrying", limit=_FAILING_LIMIT)
                + utils.list_jobs(state="failed", limit=_FAILING_LIMIT),
                key=lambda info: info.job.updated_at,
                reverse=True,
            )
            pools = utils.list_pools()
            live = {pool.pool_id for pool in pools if pool.live}
            throughput = task_throughput(stats)
            return "overview.html", {
                "title": "Overview",
                "report": report,
                # The unserved-task warnings come from the dashboard's own query (with links).
                "fleet_warnings": [
                    w for w in report.warnings if not w.startswith("no live pool serves")
                ],
                "unserved": unserved,
                "chart": Markup(
                    render_chart(
                        report.now,
                        _per_minute(stats, "finished"),
                        _per_minute(stats, "failed"),
                    )
                ),
                "throughput": [
                    (
                        row,
                        Markup(
                            render_chart(
                                report.now,
                                _per_minute(stats, "finished", row.task),
                                _per_minute(stats, "failed", row.task),
                                height=70,
                            )
                        ),
                    )
                    for row in throughput[:_CHARTED_TASKS]
                ],
                "failing": failing,
                "pools": pools,
                "dead": [d for d in dead_locks if d.pool_id not in live],
                "cron": self._cron_rows(utils, report.cron),
            }

        return await self._page(request, build)

    async def _jobs_page(self, request: Request) -> Response:
        filters = _job_filters(request.query_params)
        page = _page_number(request.query_params.get("page"))

        def build(utils: WorkerUtils) -> tuple[str, dict[str, Any]]:
            with utils.connection() as conn:
                infos, total = search_jobs(
                    conn,
                    Queries(utils.schema),
                    **filters,
                    limit=PAGE_SIZE,
                    offset=(page - 1) * PAGE_SIZE,
                )
            pages = max(1, -(-total // PAGE_SIZE))
            # As the form names them (the search box is "q").
            query = {("q" if k == "text" else k): v for k, v in filters.items() if v}
            return "jobs.html", {
                "title": "Jobs",
                "infos": infos,
                "filters": filters,
                "total": total,
                "page": page,
                "pages": pages,
                "page_size": PAGE_SIZE,
                "query": query,
                "page_link": lambda n: "?" + urlencode({**query, "page": n}),
                "bulk_actions": _BULK_ACTIONS,
            }

        return await self._page(request, build)

    async def _job_page(self, request: Request) -> Response:
        job_id = _job_id(request.path_params["job_id"])
        if job_id is None:
            raise _Refused(404, "no such page")

        def build(utils: WorkerUtils) -> tuple[str, dict[str, Any]]:
            info = utils.get_job(job_id)
            return "job.html", {"title": f"Job {job_id}", "job_id": job_id, "info": info}

        return await self._page(request, build)

    async def _running_page(self, request: Request) -> Response:
        def build(utils: WorkerUtils) -> tuple[str, dict[str, Any]]:
            infos = utils.list_jobs(state="running", limit=_RUNNING_LIMIT)
            infos.sort(key=lambda info: (info.job.locked_at or info.job.run_at, info.job.id))
            pools = {pool.pool_id: pool for pool in utils.list_pools()}
            return "running.html", {"title": "Running", "infos": infos, "pools": pools}

        return await self._page(request, build)

    def _cron_rows(self, utils: WorkerUtils, items: Sequence[Any]) -> list[dict[str, Any]]:
        """Every cron item, as written, with its lag and skipped/missed minutes (24 h)."""
        with utils.connection() as conn, conn.cursor(row_factory=dict_row) as cursor:
            lags = {
                row["identifier"]: row
                for row in cursor.execute(Queries(utils.schema).dashboard_cron_lag)
            }
        lines = dict(self._cron_lines)
        for stored in utils.list_cron_items():
            lines.setdefault(stored.identifier, stored.line)
        rows = []
        for item in items:
            rows.append(
                {
                    "item": item,
                    "line": lines.get(item.identifier),
                    "lag": lags.get(item.identifier, {}),
                }
            )
        return rows

    async def _cron_page(self, request: Request) -> Response:
        def build(utils: WorkerUtils) -> tuple[str, dict[str, Any]]:
            report = utils.status(cron_items=self._cron_items)
            return "cron.html", {
                "title": "Cron",
                "rows": self._cron_rows(utils, report.cron),
                "gaps": self._gaps(utils, None),
            }

        return await self._page(request, build)

    def _gaps(self, utils: WorkerUtils, identifier: str | None) -> list[dict[str, Any]]:
        with utils.connection() as conn, conn.cursor(row_factory=dict_row) as cursor:
            return cursor.execute(
                Queries(utils.schema).dashboard_cron_gaps,
                {"identifier": identifier, "limit": _CRON_HISTORY_LIMIT},
            ).fetchall()

    async def _cron_item_page(self, request: Request) -> Response:
        identifier = request.path_params["identifier"]

        def build(utils: WorkerUtils) -> tuple[str, dict[str, Any]]:
            report = utils.status(cron_items=self._cron_items)
            rows = [
                row
                for row in self._cron_rows(utils, report.cron)
                if row["item"].identifier == identifier
            ]
            history = utils.cron_history(identifier=identifier, limit=_CRON_HISTORY_LIMIT)
            if not rows and not history:
                raise _Refused(404, "no such cron item")
            return "cron_item.html", {
                "title": f"Cron item {identifier}",
                "identifier": identifier,
                "row": rows[0] if rows else None,
                "history": history,
                "gaps": self._gaps(utils, identifier),
                "can_run": self._find_cron_item(utils, identifier) is not None,
            }

        return await self._page(request, build)

    async def _crashes_page(self, request: Request) -> Response:
        def build(utils: WorkerUtils) -> tuple[str, dict[str, Any]]:
            pools = utils.list_pools()
            live = {pool.pool_id for pool in pools if pool.live}
            with utils.connection() as conn:
                dead = [d for d in find_dead_pools(conn, utils.schema) if d.pool_id not in live]
                with conn.cursor(row_factory=dict_row) as cursor:
                    crashes = cursor.execute(
                        Queries(utils.schema).dashboard_job_crashes, {"limit": _CRASH_LIMIT}
                    ).fetchall()
            return "crashes.html", {
                "title": "Crashes",
                "dead": dead,
                "stale": [pool for pool in pools if not pool.live],
                "crashes": crashes,
            }

        return await self._page(request, build)

    async def _limits_page(self, request: Request) -> Response:
        def build(utils: WorkerUtils) -> tuple[str, dict[str, Any]]:
            return "limits.html", {
                "title": "Limits and pauses",
                "limits": utils.list_limits(),
                "pauses": utils.list_pauses(),
            }

        return await self._page(request, build)

    # --- live updates ------------------------------------------------------------------

    def _totals(self) -> dict[str, Any]:
        with self.database() as utils:
            report = utils.status()
        return {
            "now": report.now.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "totals": {state: getattr(report.totals, state) for state in JOB_STATES},
        }

    async def _events(self, request: Request) -> Response:
        """Server-sent events: the job counts every few seconds while the page listens."""
        first = await run_in_threadpool(self._totals)

        async def stream() -> AsyncIterator[str]:
            yield f"retry: {int(LIVE_INTERVAL_S * 1000)}\n\n"
            yield f"event: totals\ndata: {json.dumps(first)}\n\n"
            ends = time.monotonic() + self._stream_s
            while time.monotonic() + LIVE_INTERVAL_S < ends and not self._closing.is_set():
                await asyncio.sleep(LIVE_INTERVAL_S)
                if self._closing.is_set():
                    break
                try:
                    data = await run_in_threadpool(self._totals)
                except (psycopg.Error, PoolTimeout) as exc:
                    logger.warning("Dashboard: a live update failed: %s", exc)
                    break
                yield f"event: totals\ndata: {json.dumps(data)}\n\n"

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"X-Accel-Buffering": "no"},
        )

    # --- actions ---------------------------------------------------------------------

    async def _checked_form(self, request: Request) -> FormData:
        """The action's form, once its Origin, size and CSRF token passed."""
        host = request.headers.get("host", "").lower()
        source = request.headers.get("origin") or request.headers.get("referer")
        if not source or source == "null":
            raise _Refused(403, "actions need an Origin or Referer header")
        if urlsplit(source).netloc.lower() != host:
            raise _Refused(403, "cross-site request refused")
        given = request.headers.get("content-length")
        if given is None:
            raise _Refused(411, "actions need a Content-Length")
        if not (given.isascii() and given.isdigit()):
            raise _Refused(400, f"Content-Length is not a size: {given[:20]!r}")
        if len(given) > 12 or int(given) > _MAX_FORM_BYTES:
            raise _Refused(413, "form too large")
        form = await request.form(max_files=0, max_fields=BULK_LIMIT + 100)
        cookie = request.cookies.get(_CSRF_COOKIE)
        expected = self.csrf_token.encode()
        csrf = form.get("csrf")
        if not (
            isinstance(csrf, str)
            and hmac.compare_digest(csrf.encode(), expected)
            and cookie is not None
            and hmac.compare_digest(cookie.encode(), expected)
        ):
            raise _Refused(403, "missing or stale form token; reload the page")
        return form

    def _back(self, request: Request, form: FormData, ok: bool, message: str) -> Response:
        base = _base(request)
        back = same_origin_path(_text(form, "next"), base + "/")
        flash = self._flash(ok, message)
        separator = "&" if "?" in back else "?"
        response = RedirectResponse(
            f"{back}{separator}{urlencode({'flash': flash})}", status_code=303
        )
        self._set_cookies(response)
        return response

    async def _action(self, request: Request) -> Response:
        form = await self._checked_form(request)
        name = request.path_params["name"]
        fields = {key: _text(form, key) for key in form}

        def run() -> tuple[bool, str]:
            try:
                with self.database() as utils:
                    return self._do(utils, name, fields)
            except KongtaskError as exc:
                return False, str(exc)

        ok, message = await run_in_threadpool(run)
        return self._back(request, form, ok, message)

    def _flash(self, ok: bool, message: str) -> str:
        key = secrets.token_urlsafe(8)
        with self._flash_lock:
            self._flashes[key] = (ok, message)
            while len(self._flashes) > _MAX_FLASHES:
                self._flashes.popitem(last=False)
        return key

    def _do(self, utils: WorkerUtils, name: str, form: dict[str, str]) -> tuple[bool, str]:
        if name == "unlock":
            return self._unlock(utils, form.get("pool_id", ""))
        if name == "run_cron":
            return self._run_cron(utils, form.get("identifier", ""))
        if name in _FLEET_ACTIONS:
            return _fleet_action(utils, name, form)
        if name == "remove" and "key" in form:
            key = form.get("key", "")
            removed = utils.remove_job(key)
            if removed is None:
                return False, f"No job holds the key {key!r}"
            if removed.key is None and removed.locked_at is not None:
                return True, f"Job {removed.id} is running; it lost its key and will not retry"
            return True, f"Removed job {removed.id} (key {key!r})"
        given = form.get("job_id", "")
        job_id = _job_id(given)
        if job_id is None:
            raise _Refused(400, f"not a job id: {given[:40]!r}")
        if name == "cancel":
            return _cancel(utils, job_id, form.get("reason", "").strip() or None)
        if name not in _BULK_ACTIONS:
            raise _Refused(404, f"no action {name!r}")
        done, verb = _apply(utils, name, [job_id], form)
        if not done:
            return False, f"Job {job_id} was not changed: it is running, or no longer exists"
        return True, verb.format(job_id)

    def _unlock(self, utils: WorkerUtils, pool_id: str) -> tuple[bool, str]:
        if not pool_id:
            return False, "No pool id given"
        live = {pool.pool_id for pool in utils.list_pools(live_only=True)}
        if pool_id in live:
            return False, f"Pool {pool_id} sent a heartbeat recently; it is alive, not unlocked"
        with utils.connection() as conn, conn.transaction():
            # Checked again in the transaction that unlocks (a reconnecting pool
            # has no session for a moment).
            dead = {holder.pool_id for holder in find_dead_pools(conn, utils.schema)}
            if pool_id not in dead:
                return False, f"Pool {pool_id} is live or holds nothing"
            conn.execute(Queries(utils.schema).force_unlock_workers, {"worker_ids": [pool_id]})
        return True, f"Unlocked the jobs and queues held by {pool_id}"

    def _find_cron_item(self, utils: WorkerUtils, identifier: str) -> ParsedCronItem | None:
        for item in self._cron_items:
            if item.identifier == identifier:
                return item
        for stored in utils.list_cron_items():
            if stored.identifier == identifier:
                return stored.item
        return None

    def _run_cron(self, utils: WorkerUtils, identifier: str) -> tuple[bool, str]:
        """Enqueue a cron item's task now, with the payload and options its firings use."""
        item = self._find_cron_item(utils, identifier)
        if item is None:
            return False, f"No cron item {identifier!r}"
        # The job a firing at this moment adds (payload with `_cron`, the item's options).
        spec = job_spec(item, datetime.now(UTC), backfilled=False)
        job = utils.add_job(
            spec["task"],
            spec["payload"],
            queue_name=spec["queue_name"],
            max_attempts=spec["max_attempts"],
            job_key=spec["job_key"],
            job_key_mode=spec["job_key_mode"],
            priority=spec["priority"],
        )
        return True, f"Ran cron item {identifier} now: job {job.id}"

    # --- bulk actions ------------------------------------------------------------------

    async def _bulk(self, request: Request) -> Response:
        """A bulk action: first a page saying how many jobs it changes, then (confirmed) it."""
        form = await self._checked_form(request)
        op = _text(form, "op")
        if op not in _BULK_ACTIONS:
            raise _Refused(400, f"no bulk action {op[:40]!r}")
        scope = _text(form, "scope")
        if scope == "selected":
            given = [value for value in form.getlist("ids") if isinstance(value, str)]
            ids = [_job_id(value) for value in given]
            if not given or None in ids:
                raise _Refused(400, "select jobs (by id) for a bulk action")
            selected: list[int] | None = sorted({i for i in ids if i is not None})
        elif scope == "filter":
            selected = None
        else:
            raise _Refused(400, f"scope must be 'selected' or 'filter', not {scope[:20]!r}")
        filters = _job_filters(form)
        fields = {key: _text(form, key) for key in form if key != "ids"}

        def run() -> Response | tuple[bool, str]:
            with self.database() as utils:
                if selected is None:
                    with utils.connection() as conn:
                        infos, total = search_jobs(
                            conn, Queries(utils.schema), **filters, limit=BULK_LIMIT
                        )
                    ids = [info.job.id for info in infos]
                else:
                    ids, total = selected, len(selected)
                if _text(form, "confirm") != "yes":
                    return self._render(
                        request,
                        utils,
                        "confirm.html",
                        title="Confirm",
                        op=op,
                        label=_BULK_ACTIONS[op],
                        count=len(ids),
                        total=total,
                        scope=scope,
                        ids=ids if selected is not None else [],
                        fields=fields,
                        bulk_limit=BULK_LIMIT,
                    )
                try:
                    done, _ = _apply(utils, op, ids, fields)
                except KongtaskError as exc:
                    return False, str(exc)
                return True, (
                    f"{_BULK_ACTIONS[op]}: {done} of {len(ids)} jobs changed"
                    + (" (running or gone ones are left alone)" if done < len(ids) else "")
                )

        result = await run_in_threadpool(run)
        if isinstance(result, Response):
            return result
        return self._back(request, form, *result)


def _apply(utils: WorkerUtils, op: str, ids: list[int], form: dict[str, str]) -> tuple[int, str]:
    """Retry, fail, remove or reschedule ``ids``; how many changed and a message template."""
    if not ids:
        return 0, ""
    if op == "retry":
        return len(utils.retry_jobs(ids)), "Retrying job {} now"
    if op == "fail":
        reason = form.get("reason", "").strip()
        if not reason:
            raise KongtaskError("Give a reason to fail a job")
        return len(utils.permanently_fail_jobs(ids, reason)), "Failed job {} permanently"
    if op == "remove":
        return len(utils.complete_jobs(ids)), "Removed job {}"
    at = parse_time(form.get("at", "").strip(), name="the new run time")
    changed = utils.reschedule_jobs(ids, run_at=at)
    return len(changed), "Rescheduled job {} to " + at.astimezone(UTC).strftime(
        "%Y-%m-%d %H:%M:%S UTC"
    )


def _cancel(utils: WorkerUtils, job_id: int, reason: str | None) -> tuple[bool, str]:
    """Cancel one job and say in plain words what became of it (success or not)."""
    result = utils.cancel_job(job_id, reason)
    if result.outcome == "cancelled":
        return True, f"Cancelled job {job_id}: it was waiting and has failed permanently"
    if result.outcome == "signalled":
        message = (
            f"Job {job_id} is running: asked pool {result.pool_id} to abort it; "
            "it fails permanently when its handler stops"
        )
        live = {pool.pool_id for pool in utils.list_pools(live_only=True)}
        if result.pool_id not in live:
            # A dead kongtask pool (or a Node worker) never hears the signal.
            message += (
                ". That pool sent no recent heartbeat: if it is dead, unlock it "
                "(overview, Pools) and cancel the job again"
            )
        return True, message
    if result.outcome == "finished":
        return False, f"Job {job_id} had already failed permanently; nothing to cancel"
    return False, f"No job {job_id}: it completed, was removed or never existed"


def source_lines(text: str, items: Sequence[ParsedCronItem]) -> dict[str, str]:
    """Each item's crontab line as written in ``text`` (by identifier), for the cron pages."""
    lines = text.splitlines()
    return {
        item.identifier: lines[item.source_line - 1].strip()
        for item in items
        if item.source_line is not None and 0 < item.source_line <= len(lines)
    }


def _per_minute(
    stats: Sequence[dict[str, Any]], column: str, task: str | None = None
) -> dict[datetime, int]:
    """``column`` summed per minute (of one ``task``, or all) from dashboard_task_stats rows."""
    result: dict[datetime, int] = {}
    for row in stats:
        if task is None or row["task"] == task:
            minute = floor_minute(row["minute"])
            result[minute] = result.get(minute, 0) + row[column]
    return result


def _static_mount() -> Any:
    from starlette.routing import Mount

    return Mount(
        "/static", app=StaticFiles(packages=[("kongtask.ops.dashboard", "static")]), name="static"
    )


def _base(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


def _text(form: Any, name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""


def _job_filters(params: Any) -> dict[str, Any]:
    """The job list's filters from a query or form: task, queue, state, text."""
    filters = {name: (_text(params, name).strip() or None) for name in ("task", "queue", "state")}
    filters["text"] = _text(params, "q").strip() or None
    if filters["state"] is not None and filters["state"] not in JOB_STATES:
        raise _Refused(400, f"unknown state {filters['state'][:40]!r}")
    return filters


_FLEET_ACTIONS = ("set_limit", "clear_limit", "pause", "resume")


def _fleet_action(utils: WorkerUtils, name: str, form: dict[str, str]) -> tuple[bool, str]:
    """Set or clear a limit, pause or resume, from the limits page's forms."""
    kind, key = form.get("kind", ""), form.get("key", "").strip()
    if kind not in ("task", "queue", "flag") or (kind == "flag" and name in ("pause", "resume")):
        raise _Refused(400, f"not a key kind: {kind[:20]!r}")
    where = {"task": {"task": key}, "queue": {"queue": key}, "flag": {"flag": key}}[kind]
    if name == "set_limit":
        given = form.get("concurrency", "").strip()
        if given and not (given.isascii() and given.isdigit() and len(given) <= 9):
            return False, f"concurrency must be a whole number of at least 1, not {given[:20]!r}"
        limit = utils.set_limit(
            **where,
            concurrency=int(given) if given else None,
            rate=form.get("rate", "").strip() or None,
        )
        caps = [f"{limit.concurrency} at once" if limit.concurrency else "", str(limit.rate or "")]
        return True, f"Limited {kind} {key!r}: " + ", ".join(c for c in caps if c)
    if name == "clear_limit":
        if utils.clear_limit(**where):
            return True, f"Cleared the limit on {kind} {key!r}"
        return False, f"No limit on {kind} {key!r}"
    if name == "pause":
        paused = utils.pause(**where, by=form.get("by", "").strip() or "dashboard")
        return True, f"Paused {kind} {key!r} (by {paused.paused_by})"
    if utils.resume(**where):
        return True, f"Resumed {kind} {key!r}"
    return False, f"{kind.capitalize()} {key!r} was not paused"


def _page_number(text: str | None) -> int:
    if text is None or text == "":
        return 1
    if not (text.isascii() and text.isdigit()) or len(text) > 9 or int(text) < 1:
        raise _Refused(400, f"not a page number: {text[:20]!r}")
    return int(text)


def _job_id(text: str) -> int | None:
    """``text`` as a job id (ASCII digits, a bigint above zero), else None.

    ``str.isdigit`` alone also accepts "²" (which ``int`` refuses) and other
    scripts' digits (which it reads), and ``int`` refuses more than 4,300 digits.
    """
    if not (text.isascii() and text.isdigit()) or len(text.lstrip("0")) > 19:
        return None
    value = int(text)
    return value if 0 < value <= _MAX_JOB_ID else None


def same_origin_path(value: str, default: str) -> str:
    """``value`` if it is a path on this site a browser cannot take elsewhere, else ``default``.

    Accepted: one leading ``/`` followed by printable ASCII, without a
    backslash. That refuses ``//host`` and a scheme, a CR/LF (header
    injection), and what browsers rewrite into ``//host``: they read ``\\`` as
    ``/`` and drop tabs and newlines anywhere in a URL. The path is also
    checked percent-decoded (until nothing changes), for a server or proxy
    in front that decodes ``/%5Chost`` or ``/%2F/host`` before redirecting.
    """
    if not _plain_path(value):
        return default
    path = urlsplit(value).path
    for _ in range(8):
        decoded = unquote(path, errors="replace")
        if decoded == path:
            return value
        if decoded.startswith("//") or any(c == "\\" or not c.isprintable() for c in decoded):
            return default
        path = decoded
    return default  # still decoding after 8 rounds: nobody sends that in good faith


def _plain_path(value: str) -> bool:
    return (
        value.startswith("/")
        and not value.startswith("//")
        and "\\" not in value
        and all("!" <= c <= "~" for c in value)
    )


def _strip_flash(request: Request) -> str:
    """The request's own path and query (without ``flash``): where an action comes back to."""
    query = [(k, v) for k, v in parse_qsl(request.url.query) if k not in ("flash", "token")]
    rest = urlencode(query)
    return quote(request.scope["path"]) + (f"?{rest}" if rest else "")
