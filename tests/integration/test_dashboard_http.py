"""The dashboard over HTTP: pages, actions, and the protections around the actions."""

from __future__ import annotations

import html
import http.client
import io
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode
from wsgiref.util import setup_testing_defaults

import psycopg
import pytest

from kongtask import ConfigurationError
from kongtask.dashboard import Dashboard, DashboardServer
from tests.integration.ops_support import DEAD_POOL, LIVE_POOL, ids_by_sql, seed_every_state

TOKEN = "s3cret-token-for-tests"


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
    assert "SameSite=Strict" in headers["set-cookie"]
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
    app = Dashboard(db_url)
    try:
        environ: dict[str, Any] = {
            "SCRIPT_NAME": "/ops",
            "PATH_INFO": "/",
            "wsgi.input": io.BytesIO(),
        }
        setup_testing_defaults(environ)
        started: list[Any] = []
        body = b"".join(app(environ, lambda status, headers: started.append(status)))
        assert started == ["200 OK"]
        assert b'href="/ops/jobs?state=failed"' in body
        assert b'action="/ops/actions/retry"' in body
    finally:
        app.close()
