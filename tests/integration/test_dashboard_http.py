"""The dashboard over HTTP: pages, actions, and the protections around the actions."""

from __future__ import annotations

import html
import http.client
import io
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode
from wsgiref.util import setup_testing_defaults

import psycopg
import pytest

from kongtask import ConfigurationError, JobCancelledError, Runner, WorkerUtils
from kongtask.ops.dashboard import Dashboard, DashboardServer
from kongtask.ops.dashboard.app import POOL_SIZE
from tests.integration.ops_support import DEAD_POOL, LIVE_POOL, ids_by_sql, seed_every_state
from tests.integration.worker_support import DEADLINE_S, Abortable, jobs, recording, wait_until

TOKEN = "s3cret-token-for-tests"
#: The dashboard's statement deadline (README, "The dashboard").
DASHBOARD_DEADLINE_S = 5.0


class Client:
    """A tiny HTTP client that keeps the dashboard's cookies, like a browser would."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.cookies: dict[str, str] = {}

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, **headers: str
    ) -> tuple[int, dict[str, str], str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            sent = {"Host": f"127.0.0.1:{self.port}", **headers}
            if self.cookies:
                sent.setdefault("Cookie", "; ".join(f"{k}={v}" for k, v in self.cookies.items()))
            data = None
            if body is not None:
                data = urlencode(body)
                sent["Content-Type"] = "application/x-www-form-urlencoded"
            conn.request(method, path, body=data, headers=sent)
            response = conn.getresponse()
            for header, value in response.getheaders():
                if header.lower() == "set-cookie":
                    name, _, rest = value.partition("=")
                    self.cookies[name] = rest.split(";")[0]
            got = {k.lower(): v for k, v in response.getheaders()}
            return response.status, got, response.read().decode()
        finally:
            conn.close()

    def csrf(self) -> str:
        status, _, body = self.request("GET", "/")
        assert status == 200, body
        match = re.search(r'name="csrf" value="([^"]+)"', body)
        assert match, "no CSRF field on the page"
        return match.group(1)

    def post(self, action: str, fields: dict[str, Any], **headers: str) -> tuple[int, str]:
        origin = {"Origin": f"http://127.0.0.1:{self.port}"}
        status, got, body = self.request(
            "POST", f"/actions/{action}", fields, **{**origin, **headers}
        )
        if status == 303:
            _, _, page = self.request("GET", got["location"])
            flash = re.search(r'<div class="flash[^"]*" role="status">([^<]*)</div>', page)
            return status, html.unescape(flash.group(1)) if flash else ""
        return status, body


@pytest.fixture
def seeded(db: psycopg.Connection[Any]) -> dict[str, list[int]]:
    return seed_every_state(db)


@pytest.fixture
def client(db_url: str, seeded: dict[str, list[int]]) -> Iterator[Client]:
    with DashboardServer(db_url, port=0) as server:
        yield Client(server.port)


def test_pages_render_and_carry_protections(client: Client, seeded: dict[str, list[int]]) -> None:
    status, headers, body = client.request("GET", "/")
    assert status == 200
    assert "default-src 'none'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"
    assert "samesite=strict" in headers["set-cookie"].lower()
    assert 'data-state="failed">2<' in body
    assert "<svg" in body and "SMTP timeout" in body
    status, _, body = client.request("GET", "/jobs?state=failed")
    assert status == 200 and "mailbox full" in body and "SMTP timeout" not in body
    status, _, body = client.request("GET", f"/jobs/{seeded['retrying'][0]}")
    assert status == 200 and "2 of 5 (3 left)" in body
    assert client.request("GET", "/jobs?state=stuck")[0] == 400
    assert client.request("GET", "/nowhere")[0] == 404


def test_actions_change_the_database(
    client: Client, db: psycopg.Connection[Any], seeded: dict[str, list[int]]
) -> None:
    csrf = client.csrf()
    failed = seeded["failed"][0]
    status, flash = client.post("retry", {"csrf": csrf, "job_id": failed, "next": "/"})
    assert (status, flash) == (303, f"Retrying job {failed} now")
    assert failed in ids_by_sql(db, "retrying")

    ready = seeded["ready"][0]
    status, flash = client.post("fail", {"csrf": csrf, "job_id": ready, "reason": "not needed"})
    assert flash == f"Failed job {ready} permanently"
    assert ready in ids_by_sql(db, "failed")

    later = seeded["ready"][1]
    status, flash = client.post("reschedule", {"csrf": csrf, "job_id": later, "at": "+3h"})
    assert flash.startswith(f"Rescheduled job {later} to ")
    assert later in ids_by_sql(db, "scheduled")

    status, flash = client.post("reschedule", {"csrf": csrf, "job_id": later, "at": "soonish"})
    assert "the new run time expects 'now', '+DURATION'" in flash

    running = seeded["running"][0]
    status, flash = client.post("retry", {"csrf": csrf, "job_id": running})
    assert flash == f"Job {running} was not changed: it is running, or no longer exists"

    db.execute("select graphile_worker.add_job('email', job_key => 'k1')")
    status, flash = client.post("remove", {"csrf": csrf, "key": "k1"})
    assert flash.startswith("Removed job ")
    assert db.execute(
        "select count(*) from graphile_worker._private_jobs where key = 'k1'"
    ).fetchone() == (0,)


def test_unlock_frees_a_dead_pool_and_refuses_a_live_one(
    client: Client, db: psycopg.Connection[Any], seeded: dict[str, list[int]]
) -> None:
    csrf = client.csrf()
    _, _, page = client.request("GET", "/")
    assert DEAD_POOL in page
    _, flash = client.post("unlock", {"csrf": csrf, "pool_id": LIVE_POOL})
    assert flash == f"Pool {LIVE_POOL} sent a heartbeat recently; it is alive, not unlocked"
    _, flash = client.post("unlock", {"csrf": csrf, "pool_id": DEAD_POOL})
    assert flash == f"Unlocked the jobs and queues held by {DEAD_POOL}"
    assert ids_by_sql(db, "running") == []
    assert db.execute(
        "select count(*) from graphile_worker._private_job_queues where locked_by is not null"
    ).fetchone() == (0,)


def test_forged_requests_are_refused_and_change_nothing(
    client: Client, db: psycopg.Connection[Any], seeded: dict[str, list[int]]
) -> None:
    csrf = client.csrf()
    failed = seeded["failed"][0]
    fields = {"csrf": csrf, "job_id": failed}
    evil = {"Origin": "http://evil.example"}
    assert client.post("retry", fields, **evil)[0] == 403
    assert client.post("retry", {"job_id": failed})[0] == 403  # no token
    assert client.post("retry", {**fields, "csrf": "guess"})[0] == 403
    no_cookie = Client(client.port)
    assert no_cookie.post("retry", fields)[0] == 403  # token without its cookie
    status, _, body = client.request("POST", "/actions/retry", fields)  # neither Origin nor Referer
    assert status == 403 and "Origin or Referer" in body
    status, _, _ = client.request("GET", "/", Host="rebind.example:80")
    assert status == 421
    assert client.request("GET", "/actions/retry")[0] == 405
    assert failed in ids_by_sql(db, "failed")  # nothing changed


def test_token_is_required_when_set(db_url: str, seeded: dict[str, list[int]]) -> None:
    with DashboardServer(db_url, port=0, token=TOKEN) as server:
        client = Client(server.port)
        status, _, body = client.request("GET", "/")
        assert status == 401 and "?token=" in body
        assert client.request("GET", "/?token=wrong-token-xx")[0] == 403
        status, headers, _ = client.request("GET", f"/jobs?token={TOKEN}")
        assert status == 303 and headers["location"] == "/jobs"
        assert client.request("GET", "/")[0] == 200  # the cookie now carries it
        bearer = Client(server.port)
        assert bearer.request("GET", "/", Authorization=f"Bearer {TOKEN}")[0] == 200


def test_other_addresses_need_a_token(db_url: str) -> None:
    with pytest.raises(ConfigurationError, match="without a token") as info:
        DashboardServer(db_url, host="0.0.0.0", port=0)
    assert info.value.name == "--host"
    DashboardServer(db_url, host="0.0.0.0", port=0, token=TOKEN)  # accepted (not started)


def test_mounted_under_a_prefix(db_url: str, seeded: dict[str, list[int]]) -> None:
    dashboard = Dashboard(db_url)
    app = dashboard.wsgi()  # what the Flask and Django mounts serve
    try:
        environ: dict[str, Any] = {
            "SCRIPT_NAME": "/ops",
            "PATH_INFO": "/",
            "wsgi.input": io.BytesIO(),
        }
        setup_testing_defaults(environ)
        started: list[Any] = []
        body = b"".join(app(environ, lambda status, headers, exc_info=None: started.append(status)))
        assert started == ["200 OK"]
        assert b'href="/ops/jobs?state=failed"' in body
        assert b'action="/ops/actions/retry"' in body
        assert b'src="/ops/static/dashboard.js"' in body
        # Under a WSGI host a live update is one short answer (the browser asks again).
        environ["PATH_INFO"] = "/events"
        started.clear()
        events = b"".join(
            app(environ, lambda status, headers, exc_info=None: started.append(status))
        )
        assert started == ["200 OK"]
        assert events.startswith(b"retry: 5000\n\nevent: totals\ndata: {")
        assert events.count(b"event: totals") == 1
    finally:
        dashboard.close()


# --- issue 14: the dashboard's edges ------------------------------------------------

HOSTILE_NEXT = [
    "/\r\nSet-Cookie: injected=1",
    "/\nSet-Cookie: injected=1",
    "/\\evil.example/",
    "/\t/evil.example/",
    "//evil.example/",
    "/%5Cevil.example",
    "/%09/evil.example",
    "/%2F/evil.example",
    "https://evil.example/",
    "javascript:alert(1)",
]


def raw_request(port: int, data: bytes, timeout_s: float = 10.0) -> bytes:
    """Send ``data`` as is (what http.client refuses to send) and read the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_next_only_redirects_to_a_path_on_this_site(
    client: Client, seeded: dict[str, list[int]]
) -> None:
    csrf = client.csrf()
    origin = {"Origin": f"http://127.0.0.1:{client.port}"}
    job = seeded["failed"][0]
    for hostile in HOSTILE_NEXT:
        fields = {"csrf": csrf, "job_id": job, "next": hostile}
        status, headers, _ = client.request("POST", "/actions/retry", fields, **origin)
        assert status == 303, hostile
        assert re.fullmatch(r"/\?flash=[\w-]+", headers["location"]), (hostile, headers)
        assert "injected" not in client.cookies, hostile
    fields = {"csrf": csrf, "job_id": job, "next": "/jobs?state=failed"}
    status, headers, _ = client.request("POST", "/actions/retry", fields, **origin)
    assert status == 303
    assert re.fullmatch(r"/jobs\?state=failed&flash=[\w-]+", headers["location"])


def test_the_token_login_only_redirects_to_a_path_on_this_site(
    db_url: str, seeded: dict[str, list[int]]
) -> None:
    with DashboardServer(db_url, port=0, token=TOKEN) as server:
        host = f"Host: 127.0.0.1:{server.port}\r\n"
        # PATH_INFO arrives decoded: these were "//evil.example", "/\\evil.example" and a CR/LF.
        for path in ("/%2F/evil.example", "/%5Cevil.example", "/%0D%0ASet-Cookie:%20injected=1"):
            answer = raw_request(
                server.port, f"GET {path}?token={TOKEN} HTTP/1.0\r\n{host}\r\n".encode()
            )
            head = answer.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
            assert head[0].split()[1] == "303", (path, head)
            lines = [line.lower() for line in head]
            assert "location: /" in lines, (path, head)
            assert not any(line.startswith("set-cookie: injected") for line in lines), head
        client = Client(server.port)
        status, headers, _ = client.request("GET", f"/jobs/{seeded['failed'][0]}?token={TOKEN}")
        assert status == 303 and headers["location"] == f"/jobs/{seeded['failed'][0]}"


def test_malformed_job_ids_are_404_in_a_path_and_400_in_a_form(
    client: Client, db: psycopg.Connection[Any], seeded: dict[str, list[int]]
) -> None:
    for path in (
        "/jobs/%B2",
        "/jobs/%D9%A3",  # ARABIC-INDIC DIGIT THREE in UTF-8
        "/jobs/abc",
        "/jobs/99999999999999999999",
        "/jobs/9223372036854775808",
        "/jobs/" + "9" * 5000,
        "/jobs/-1",
        "/jobs/0",
        "/jobs/",
    ):
        status, _, body = client.request("GET", path)
        assert status == 404, (path, status, body[:300])
        assert "Traceback" not in body
    csrf = client.csrf()
    before = {state: ids_by_sql(db, state) for state in ("failed", "ready", "running")}
    for action in ("retry", "fail", "reschedule", "cancel"):
        for bad in ("²", "٣", "abc", "", "-1", "0", "99999999999999999999", "9" * 5000):
            fields = {"csrf": csrf, "job_id": bad, "reason": "no", "at": "+1h"}
            status, body = client.post(action, fields)
            assert status == 400, (action, bad, status, body[:300])
            assert "not a job id" in body and "Traceback" not in body
    assert {state: ids_by_sql(db, state) for state in ("failed", "ready", "running")} == before
    # A Content-Length that is not a number of bytes is refused, not read until the client hangs up.
    cookie = f"kongtask_csrf={client.cookies['kongtask_csrf']}"
    answer = raw_request(
        client.port,
        (
            f"POST /actions/retry HTTP/1.0\r\nHost: 127.0.0.1:{client.port}\r\n"
            f"Origin: http://127.0.0.1:{client.port}\r\nCookie: {cookie}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: -1\r\n\r\n"
        ).encode(),
    )
    assert answer.split(b" ")[1] == b"400", answer[:200]


class RecordedLogs(logging.Handler):
    """Every kongtask log record, with a way to wait for one (the request log comes late)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage() + (
            "\n" + logging.Formatter().formatException(record.exc_info) if record.exc_info else ""
        )
        with self.changed:
            self.lines.append(text)
            self.changed.notify_all()

    def wait_for(self, fragment: str, timeout_s: float = 10.0) -> None:
        with self.changed:
            found = self.changed.wait_for(
                lambda: any(fragment in line for line in self.lines), timeout_s
            )
        assert found, f"no log line with {fragment!r}: {self.lines[-10:]}"


@pytest.fixture
def recorded_logs() -> Iterator[RecordedLogs]:
    handler = RecordedLogs()
    # kongtask's own log, and the server's (uvicorn) under the dashboard.
    packages = [logging.getLogger("kongtask"), logging.getLogger("uvicorn")]
    levels = [package.level for package in packages]
    for package in packages:
        package.addHandler(handler)
        package.setLevel(logging.DEBUG)  # what GRAPHILE_LOGGER_DEBUG=1 does
    try:
        yield handler
    finally:
        for package, level in zip(packages, levels, strict=True):
            package.removeHandler(handler)
            package.setLevel(level)


def test_the_token_never_appears_in_a_log_line(
    db_url: str,
    seeded: dict[str, list[int]],
    recorded_logs: RecordedLogs,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with DashboardServer(db_url, port=0, token=TOKEN) as server:
        client = Client(server.port)
        assert client.request("GET", f"/jobs?state=failed&token={TOKEN}")[0] == 303
        recorded_logs.wait_for('"GET /jobs?state=failed&token=')
        assert client.request("GET", f"/jobs/%B2?%74oken={TOKEN}")[0] == 303  # parsed as token
        recorded_logs.wait_for('"GET /jobs/%B2?%74oken=')
        assert client.request("GET", f"/?token={TOKEN}x")[0] == 403  # a wrong guess, close to it
        recorded_logs.wait_for(" 403 ")
        # A request line the server (uvicorn) cannot parse is refused and logged.
        answer = raw_request(server.port, f"GET /?token={TOKEN} HTTP/1.1 junk\r\n\r\n".encode())
        assert b" 400 " in answer.split(b"\r\n")[0]
        recorded_logs.wait_for("Invalid HTTP request")
        # An unforeseen error: logged with its traceback, the page says no more than that.
        csrf = client.csrf()
        with monkeypatch.context() as patch:
            patch.setattr(WorkerUtils, "retry_jobs", fail_unexpectedly)
            status, _, body = client.request(
                "POST",
                f"/actions/retry?token={TOKEN}",
                {"csrf": csrf, "job_id": seeded["failed"][0]},
                Origin=f"http://127.0.0.1:{server.port}",
            )
        assert (status, body) == (500, "Internal error; see the log.\n")
        recorded_logs.wait_for("Dashboard: POST /actions/retry failed\nTraceback")
        recorded_logs.wait_for('"POST /actions/retry?token=*** HTTP/1.1" 500')
    leaked = [line for line in recorded_logs.lines if TOKEN in line]
    assert leaked == []


def fail_unexpectedly(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("a bug")


def backend_waits_for_a_lock(db: psycopg.Connection[Any]) -> bool:
    row = db.execute(
        "select count(*) from pg_locks where not granted and database = "
        "(select oid from pg_database where datname = current_database())"
    ).fetchone()
    assert row is not None
    return bool(row[0])


def test_a_locked_jobs_table_slows_only_the_pages_that_read_it(
    client: Client, db_url: str, db: psycopg.Connection[Any], seeded: dict[str, list[int]]
) -> None:
    assert client.request("GET", "/jobs")[0] == 200  # connected and warmed up
    with psycopg.connect(db_url) as locker:
        locker.execute("lock table graphile_worker._private_jobs in access exclusive mode")
        answers: list[tuple[str, int, str, float]] = []

        def read(path: str) -> None:
            started = time.monotonic()
            status, _, body = client.request("GET", path)
            answers.append((path, status, body, time.monotonic() - started))

        # More readers than the pool has connections: waiting for one counts in the deadline.
        readers = [
            threading.Thread(target=read, args=(path,))
            for path in ["/jobs"] * (POOL_SIZE + 1) + ["/", f"/jobs/{seeded['failed'][0]}"]
        ]
        for reader in readers:
            reader.start()
        try:
            wait_until(lambda: backend_waits_for_a_lock(db), what="a page to wait for the lock")
            for path, expected in (("/nowhere", 404), ("/jobs/abc", 404), ("/healthz", 200)):
                started = time.monotonic()
                status, _, body = client.request("GET", path)
                took_s = time.monotonic() - started
                assert (status, took_s < 1.0) == (expected, True), (path, status, took_s, body)
        finally:
            for reader in readers:
                reader.join(DASHBOARD_DEADLINE_S + 10)
        assert len(answers) == len(readers)
        for path, status, body, took_s in answers:
            assert status == 503 and "did not answer within 5 s" in body, (path, status, body)
            assert took_s < DASHBOARD_DEADLINE_S + 1.0, (path, took_s)
        locker.rollback()
    assert client.request("GET", "/jobs")[0] == 200  # the pool recovered once the lock went


# --- cancelling jobs from the dashboard -----------------------------------------------


def job_row(db: psycopg.Connection[Any], job_id: int) -> dict[str, Any] | None:
    rows = [row for row in jobs(db) if row["id"] == job_id]
    return rows[0] if rows else None


def test_cancel_fails_a_waiting_job_for_good(
    client: Client, db: psycopg.Connection[Any], seeded: dict[str, list[int]]
) -> None:
    ready, plain = seeded["ready"][0], seeded["ready"][1]
    retrying, running = seeded["retrying"][0], seeded["running"][0]
    _, _, page = client.request("GET", "/jobs")
    for job in (ready, retrying, seeded["scheduled"][0], running):
        html_row = re.search(rf'<tr data-job-id="{job}">.*?</tr>', page, re.S)
        assert html_row and 'action="/actions/cancel"' in html_row.group(0), job
    failed_row = re.search(rf'<tr data-job-id="{seeded["failed"][0]}">.*?</tr>', page, re.S)
    assert failed_row and "/actions/cancel" not in failed_row.group(0)
    _, _, detail = client.request("GET", f"/jobs/{running}")
    assert 'action="/actions/cancel"' in detail and "/actions/retry" not in detail

    csrf = client.csrf()
    status, flash = client.post("cancel", {"csrf": csrf, "job_id": ready, "reason": "typo"})
    assert (status, flash) == (
        303,
        f"Cancelled job {ready}: it was waiting and has failed permanently",
    )
    row = job_row(db, ready)
    assert row is not None and row["last_error"] == "cancelled: typo"
    assert row["attempts"] == row["max_attempts"] and ready in ids_by_sql(db, "failed")

    _, flash = client.post("cancel", {"csrf": csrf, "job_id": plain, "reason": "  "})
    assert flash.startswith(f"Cancelled job {plain}:")
    assert job_row(db, plain)["last_error"] == "cancelled"  # type: ignore[index]
    _, flash = client.post("cancel", {"csrf": csrf, "job_id": retrying})
    assert flash.startswith(f"Cancelled job {retrying}:") and retrying in ids_by_sql(db, "failed")

    _, flash = client.post("cancel", {"csrf": csrf, "job_id": ready})
    assert flash == f"Job {ready} had already failed permanently; nothing to cancel"
    assert job_row(db, ready)["last_error"] == "cancelled: typo"  # type: ignore[index]
    missing = max(id for ids in seeded.values() for id in ids) + 1000
    _, flash = client.post("cancel", {"csrf": csrf, "job_id": missing})
    assert flash == f"No job {missing}: it completed, was removed or never existed"

    # A reason too long for the notice is refused with the rule, and changes nothing.
    later = seeded["scheduled"][0]
    _, flash = client.post("cancel", {"csrf": csrf, "job_id": later, "reason": "x" * 1001})
    assert "reason must be at most 1000 characters" in flash
    assert later in ids_by_sql(db, "scheduled")
    # A job held by a pool is left to that pool, which is told (this one is dead: it stays held).
    _, flash = client.post("cancel", {"csrf": csrf, "job_id": running})
    assert flash.startswith(f"Job {running} is running: asked pool {DEAD_POOL} to abort it")
    assert flash.endswith(
        "That pool sent no recent heartbeat: if it is dead, unlock it "
        "(overview, Pools) and cancel the job again"
    )
    assert running in ids_by_sql(db, "running")
    # As it says: once the dead pool is unlocked, the job waits and a cancel fails it.
    client.post("unlock", {"csrf": csrf, "pool_id": DEAD_POOL})
    _, flash = client.post("cancel", {"csrf": csrf, "job_id": running})
    assert flash.startswith(f"Cancelled job {running}:") and running in ids_by_sql(db, "failed")


def test_cancel_without_the_form_token_is_refused_and_changes_nothing(
    client: Client, db: psycopg.Connection[Any], seeded: dict[str, list[int]]
) -> None:
    csrf = client.csrf()
    ready = seeded["ready"][0]
    assert client.post("cancel", {"job_id": ready})[0] == 403
    assert client.post("cancel", {"csrf": "guess", "job_id": ready})[0] == 403
    assert Client(client.port).post("cancel", {"csrf": csrf, "job_id": ready})[0] == 403
    assert (
        client.post("cancel", {"csrf": csrf, "job_id": ready}, Origin="http://evil.example")[0]
        == 403
    )
    assert client.request("GET", "/actions/cancel")[0] == 405
    row = job_row(db, ready)
    assert row is not None and row["attempts"] == 0 and row["last_error"] is None


def test_cancel_a_running_job_from_the_dashboard(db_url: str, db: psycopg.Connection[Any]) -> None:
    waits = Abortable()
    runner = Runner(tasks={"waits": waits}, connection_string=db_url, install_signal_handlers=False)
    with (
        recording(runner) as log,
        runner,
        DashboardServer(db_url, port=0) as server,
    ):
        job = runner.add_job("waits", {})
        assert waits.started.wait(DEADLINE_S), "the job never started"
        client = Client(server.port)
        _, _, page = client.request("GET", f"/jobs/{job.id}")
        assert "The job is running" in page and 'action="/actions/cancel"' in page
        csrf = re.search(r'name="csrf" value="([^"]+)"', page)
        assert csrf is not None
        status, flash = client.post(
            "cancel", {"csrf": csrf.group(1), "job_id": job.id, "reason": "stop it"}
        )
        assert status == 303
        assert flash == (
            f"Job {job.id} is running: asked pool {runner.pool_id} to abort it; "
            "it fails permanently when its handler stops"
        )
        assert waits.aborted.wait(DEADLINE_S), "the pool never set the job's abort event"
        log.wait_for("job:failed")
        [failed] = log.payloads("job:failed")
        assert isinstance(failed["error"], JobCancelledError)
        runner.join(DEADLINE_S)
    row = job_row(db, job.id)
    assert row is not None and row["last_error"] == "cancelled: stop it"
    assert row["attempts"] == row["max_attempts"] and row["locked_by"] is None
    assert row["is_available"] is False
