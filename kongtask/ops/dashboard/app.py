"""The dashboard as a WSGI application: server-rendered pages and POST actions.

Mount it in a host's WSGI server (``Dashboard(...)`` is the app; under a
prefix, the host sets ``SCRIPT_NAME``), or run ``kongtask dashboard``.

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
- pages forbid framing and load nothing from elsewhere (CSP ``default-src 'none'``).

Each request borrows one connection from a small pool and waits for the
database ``statement_timeout_s`` at most, so a locked table makes the pages
that read it answer 503 after the deadline while other requests are served.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from http.cookies import SimpleCookie
from importlib import resources
from string import Template
from typing import Any, Self
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import ConnectionPool, PoolTimeout

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
from kongtask.ops.dashboard.chart import ThroughputSampler, floor_minute, render_chart
from kongtask.ops.status import JOB_STATES, failures_by_minute, jobs_deleted_total
from kongtask.validate import check_seconds
from kongtask.worker_utils import WorkerUtils

__all__ = ["POOL_SIZE", "STATEMENT_TIMEOUT_S", "Dashboard", "same_origin_path"]

logger = logging.getLogger(__name__)

StartResponse = Callable[..., Any]

_CSRF_COOKIE = "kongtask_csrf"
_TOKEN_COOKIE = "kongtask_token"
_MAX_FORM_BYTES = 64 * 1024
_MAX_JOB_ID = 2**63 - 1  # job ids are bigints
_MAX_FLASHES = 256
_LIST_LIMIT = 200
_FAILING_LIMIT = 50
_SECURITY_HEADERS = [
    (
        "Content-Security-Policy",
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
    ("Cache-Control", "no-store"),
]

#: How long a page waits for the database: for a pooled connection, then for each statement.
STATEMENT_TIMEOUT_S = 5.0
#: Connections the dashboard keeps open at most.
POOL_SIZE = 4
#: The client-side deadline's lead over the server's statement_timeout: it only
#: fires when the server went silent (the server cancels a slow statement itself).
_SILENT_SERVER_MARGIN_S = 2.0
#: How long opening the pool may wait for its first connection.
_POOL_OPEN_TIMEOUT_S = 10.0


class _Refused(Exception):
    """A request the dashboard will not serve: (status, message)."""

    def __init__(self, status: str, message: str) -> None:
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


class Dashboard:
    """The dashboard WSGI app over one database (``connection_string`` as everywhere else).

    ``statement_timeout_s`` bounds a request's wait for a pooled connection
    together with each of its statements; past it the page answers 503.
    """

    def __init__(
        self,
        connection_string: str | None = None,
        *,
        schema: str | None = None,
        cron_items: Sequence[ParsedCronItem] = (),
        token: str | None = None,
        allowed_hosts: Iterable[str] | None = None,
        statement_timeout_s: float = STATEMENT_TIMEOUT_S,
    ) -> None:
        if token is not None and (not isinstance(token, str) or len(token) < 8):
            raise KongtaskError("the dashboard token must be a string of at least 8 characters")
        check_seconds("statement_timeout_s", statement_timeout_s, allow_minimum=False)
        self._statement_timeout_s = float(statement_timeout_s)
        self._connection_string = connection_string
        self._schema = schema
        self._cron_items = list(cron_items)
        self._token = token
        self._allowed_hosts = (
            {host.lower() for host in allowed_hosts} if allowed_hosts is not None else None
        )
        self.csrf_token = secrets.token_urlsafe(32)
        self.sampler = ThroughputSampler()
        self._pool: ConnectionPool[Any] | None = None
        self._pool_lock = threading.Lock()
        self._stack: ExitStack | None = None
        self._schema_name = ""  # resolved when the pool opens
        self._flashes: OrderedDict[str, tuple[bool, str]] = OrderedDict()
        self._flash_lock = threading.Lock()
        self._template = Template(
            resources.files(__package__).joinpath("templates/layout.html").read_text("utf-8")
        )

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
        """Close the connection pool (and the embedded server if it started one)."""
        with self._pool_lock:
            stack, self._stack, self._pool = self._stack, None, None
        if stack is not None:
            stack.close()

    def sample(self) -> None:
        """Record the jobs table's deletion counter now (feeds the throughput chart)."""
        with self.database() as utils, utils.connection() as conn:
            found = jobs_deleted_total(conn, Queries(utils.schema))
        if found is not None:
            total, now = found
            self.sampler.add(now, total)

    # --- WSGI --------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        try:
            self._check_host(environ)
            cookies = SimpleCookie(environ.get("HTTP_COOKIE", ""))
            login = self._check_token(environ, cookies)
            if login is not None:
                return self._redirect(start_response, login, token_cookie=True)
            method = environ.get("REQUEST_METHOD", "GET")
            path = environ.get("PATH_INFO", "") or "/"
            if method == "POST" and path.startswith("/actions/"):
                return self._action(environ, start_response, cookies, path[len("/actions/") :])
            if method not in ("GET", "HEAD") or path.startswith("/actions/"):
                raise _Refused("405 Method Not Allowed", "pages are GETs; actions are POSTs")
            return self._page(environ, start_response, path)
        except _Refused as refused:
            return self._plain(start_response, refused.status, str(refused))
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            logger.warning("Dashboard: database unavailable: %s", exc)
            text = "The database is unavailable; retry."
            if isinstance(exc, pg_errors.QueryCanceled | DeadlineExceeded | PoolTimeout):
                text = (
                    f"The database did not answer within {self._statement_timeout_s:g} s "
                    "(a locked table or a long query?); retry."
                )
            return self._plain(start_response, "503 Service Unavailable", text)
        except Exception:
            # The details go to the log (the path without its query, which may hold
            # the token), never into the page.
            logger.exception(
                "Dashboard: %s %s failed",
                environ.get("REQUEST_METHOD"),
                quote(str(environ.get("SCRIPT_NAME", "")) + str(environ.get("PATH_INFO", ""))),
            )
            return self._plain(
                start_response, "500 Internal Server Error", "Internal error; see the log."
            )

    def _plain(self, start_response: StartResponse, status: str, text: str) -> list[bytes]:
        body = (text + "\n").encode()
        start_response(
            status,
            [("Content-Type", "text/plain; charset=utf-8"), *_SECURITY_HEADERS],
        )
        return [body]

    def _check_host(self, environ: dict[str, Any]) -> None:
        if self._allowed_hosts is None:
            return
        host = environ.get("HTTP_HOST", "").lower()
        if host not in self._allowed_hosts:
            raise _Refused("421 Misdirected Request", f"unexpected Host header: {host!r}")

    def _check_token(self, environ: dict[str, Any], cookies: SimpleCookie) -> str | None:
        """Raise unless the request carries the token; a location to go to after a login."""
        token = self._token
        if token is None:
            return None
        query = parse_qs(environ.get("QUERY_STRING", ""))
        given = query.get("token", [None])[0]
        if given is not None and environ.get("REQUEST_METHOD") == "GET":
            if hmac.compare_digest(given.encode(), token.encode()):
                base = str(environ.get("SCRIPT_NAME", "")).rstrip("/")
                # PATH_INFO arrives percent-decoded (as latin-1): encode it again,
                # so a decoded CR/LF or "//" cannot reach the Location header.
                path = quote(str(environ.get("PATH_INFO") or "/").encode("latin-1", "replace"))
                return same_origin_path(base + path, quote(base) + "/")
            raise _Refused("403 Forbidden", "wrong token")
        header = environ.get("HTTP_AUTHORIZATION", "")
        if header.startswith("Bearer ") and hmac.compare_digest(
            header[7:].encode(), token.encode()
        ):
            return None
        cookie = cookies.get(_TOKEN_COOKIE)
        if cookie is not None and hmac.compare_digest(cookie.value.encode(), token.encode()):
            return None
        raise _Refused(
            "401 Unauthorized", "This dashboard needs its token: open it once as /?token=TOKEN"
        )

    def _cookies(self, token_cookie: bool = False) -> list[tuple[str, str]]:
        headers = [
            (
                "Set-Cookie",
                f"{_CSRF_COOKIE}={self.csrf_token}; Path=/; SameSite=Strict; HttpOnly",
            )
        ]
        if token_cookie and self._token is not None:
            headers.append(
                ("Set-Cookie", f"{_TOKEN_COOKIE}={self._token}; Path=/; SameSite=Strict; HttpOnly")
            )
        return headers

    def _redirect(
        self, start_response: StartResponse, location: str, *, token_cookie: bool = False
    ) -> list[bytes]:
        start_response(
            "303 See Other",
            [("Location", location), *self._cookies(token_cookie), *_SECURITY_HEADERS],
        )
        return [b""]

    # --- pages ---------------------------------------------------------------------

    def _page(
        self, environ: dict[str, Any], start_response: StartResponse, path: str
    ) -> list[bytes]:
        # Routed before the database is touched: a 404 or /healthz never waits for it.
        if path == "/healthz":
            return self._plain(start_response, "200 OK", "ok")
        job_id = _job_id(path[len("/jobs/") :]) if path.startswith("/jobs/") else None
        if path not in ("/", "/jobs") and job_id is None:
            raise _Refused("404 Not Found", "no such page")
        with self.database() as utils:
            return self._render(environ, start_response, path, job_id, utils)

    def _render(
        self,
        environ: dict[str, Any],
        start_response: StartResponse,
        path: str,
        job_id: int | None,
        utils: WorkerUtils,
    ) -> list[bytes]:
        base = environ.get("SCRIPT_NAME", "").rstrip("/")
        query = {
            key: values[0] for key, values in parse_qs(environ.get("QUERY_STRING", "")).items()
        }
        back = (
            base + path + (("?" + environ["QUERY_STRING"]) if environ.get("QUERY_STRING") else "")
        )
        forms = views.Forms(base, self.csrf_token, _strip_flash(back))
        now = datetime.now(UTC)
        if path == "/":
            title, body = "Overview", self._overview(utils, forms, base)
        elif path == "/jobs":
            title, body = "Jobs", self._jobs(utils, forms, base, query, now)
        elif job_id is not None:
            info = utils.get_job(job_id)
            title = f"Job {job_id}"
            body = (
                views.job_detail(info, forms)
                if info is not None
                else f"<p>No job {job_id}: it may have completed or been removed. "
                f'<a href="{views.e(base)}/">Back to the overview</a></p>'
            )
        else:
            raise _Refused("404 Not Found", "no such page")
        with self._flash_lock:
            flash = self._flashes.pop(query.get("flash", ""), None)
        flash_html = ""
        if flash is not None:
            kind = "flash" if flash[0] else "flash bad"
            flash_html = f'<div class="{kind}" role="status">{views.e(flash[1])}</div>'

        html = self._template.substitute(
            title=views.e(title),
            body=body,
            base=views.e(base),
            schema=views.e(utils.schema),
            now=views.e(now.strftime("%Y-%m-%d %H:%M:%S UTC")),
            flash=flash_html,
        )
        data = html.encode("utf-8")
        start_response(
            "200 OK",
            [
                ("Content-Type", "text/html; charset=utf-8"),
                ("Content-Length", str(len(data))),
                *self._cookies(),
                *_SECURITY_HEADERS,
            ],
        )
        return [data]

    def _overview(self, utils: WorkerUtils, forms: views.Forms, base: str) -> str:
        self.sample()
        report = utils.status(cron_items=self._cron_items)
        with utils.connection() as conn:
            failed = {
                floor_minute(m): n for m, n in failures_by_minute(conn, Queries(utils.schema))
            }
            dead_locks = find_dead_pools(conn, utils.schema)
        chart = render_chart(report.now, self.sampler.per_minute(), failed)
        failing = utils.list_jobs(state="retrying", limit=_FAILING_LIMIT) + utils.list_jobs(
            state="failed", limit=_FAILING_LIMIT
        )
        pools = utils.list_pools()
        live = {pool.pool_id for pool in pools if pool.live}
        dead = [holder for holder in dead_locks if holder.pool_id not in live]
        history_of = getattr(utils, "cron_history", None)
        history = list(history_of(limit=20)) if callable(history_of) else None
        return views.overview(
            report,
            base=base,
            chart=chart,
            chart_since=self.sampler.since,
            failing=views.failing_section(failing, forms, base, report.now),
            pools=views.pools_section(pools, dead, forms, report.now),
            cron=views.cron_section(report.cron, report.now, history),
        )

    def _jobs(
        self,
        utils: WorkerUtils,
        forms: views.Forms,
        base: str,
        query: dict[str, str],
        now: datetime,
    ) -> str:
        filters: dict[str, str | None] = {
            name: (query.get(name) or None) for name in ("task", "queue", "state")
        }
        if filters["state"] is not None and filters["state"] not in JOB_STATES:
            raise _Refused("400 Bad Request", f"unknown state {filters['state']!r}")
        infos = utils.list_jobs(
            task=filters["task"], queue=filters["queue"], state=filters["state"], limit=_LIST_LIMIT
        )
        return views.jobs_page(infos, forms, base=base, now=now, filters=filters, limit=_LIST_LIMIT)

    # --- actions ---------------------------------------------------------------------

    def _check_origin(self, environ: dict[str, Any]) -> None:
        host = environ.get("HTTP_HOST", "").lower()
        source = environ.get("HTTP_ORIGIN") or environ.get("HTTP_REFERER")
        if not source or source == "null":
            raise _Refused("403 Forbidden", "actions need an Origin or Referer header")
        if urlsplit(source).netloc.lower() != host:
            raise _Refused("403 Forbidden", "cross-site request refused")

    def _read_form(self, environ: dict[str, Any]) -> dict[str, str]:
        given = str(environ.get("CONTENT_LENGTH") or "0").strip()
        # Only ASCII digits: int() also takes "-1" (read until the client hangs up) and "٣".
        if not (given.isascii() and given.isdigit()):
            raise _Refused("400 Bad Request", f"Content-Length is not a size: {given[:20]!r}")
        length = int(given) if len(given) <= 12 else _MAX_FORM_BYTES + 1
        if length > _MAX_FORM_BYTES:
            raise _Refused("413 Content Too Large", "form too large")
        raw = environ["wsgi.input"].read(length).decode("utf-8", "replace") if length else ""
        return {key: values[0] for key, values in parse_qs(raw).items()}

    def _action(
        self,
        environ: dict[str, Any],
        start_response: StartResponse,
        cookies: SimpleCookie,
        name: str,
    ) -> list[bytes]:
        self._check_origin(environ)
        form = self._read_form(environ)
        cookie = cookies.get(_CSRF_COOKIE)
        expected = self.csrf_token.encode()
        if not (
            hmac.compare_digest(form.get("csrf", "").encode(), expected)
            and cookie is not None
            and hmac.compare_digest(cookie.value.encode(), expected)
        ):
            raise _Refused("403 Forbidden", "missing or stale form token; reload the page")
        base = environ.get("SCRIPT_NAME", "").rstrip("/")
        back = same_origin_path(form.get("next", ""), base + "/")
        try:
            with self.database() as utils:
                ok, message = self._do(utils, name, form)
        except KongtaskError as exc:
            ok, message = False, str(exc)
        flash = self._flash(ok, message)
        separator = "&" if "?" in back else "?"
        return self._redirect(start_response, f"{back}{separator}{urlencode({'flash': flash})}")

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
        if name == "remove":
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
            raise _Refused("400 Bad Request", f"not a job id: {given[:40]!r}")
        if name == "cancel":
            return _cancel(utils, job_id, form.get("reason", "").strip() or None)
        if name == "retry":
            done = utils.retry_jobs([job_id])
            verb = "Retrying job {} now"
        elif name == "fail":
            reason = form.get("reason", "").strip()
            if not reason:
                return False, "Give a reason to fail a job"
            done = utils.permanently_fail_jobs([job_id], reason)
            verb = "Failed job {} permanently"
        elif name == "reschedule":
            at = parse_time(form.get("at", "").strip(), name="the new run time")
            done = utils.reschedule_jobs([job_id], run_at=at)
            verb = "Rescheduled job {} to " + at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        else:
            raise _Refused("404 Not Found", f"no action {name!r}")
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


def _strip_flash(url: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qs(parts.query).items() if k != "flash"]
    rest = urlencode([(k, v[0]) for k, v in query])
    return parts.path + (f"?{rest}" if rest else "")
