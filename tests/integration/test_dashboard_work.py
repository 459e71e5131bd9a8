"""The dashboard as a place to work: search, pages, bulk actions, running jobs, cron, crashes.

Served by uvicorn (``DashboardServer``) against a real database; the client is
the cookie-keeping one of test_dashboard_http.
"""

from __future__ import annotations

import http.client
import json
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import psycopg
import pytest

import kongtask
from kongtask.ops.dashboard import DashboardServer
from kongtask.ops.dashboard.app import PAGE_SIZE, source_lines
from tests.integration.ops_support import DEAD_POOL, add, ids_by_sql, seed_every_state
from tests.integration.test_dashboard_http import Client

CRONTAB = "# nightly report\n0 3 * * * report ?id=nightly\n*/15 9-17 * * 1-5 email ?id=digest\n"
BULK = 120  # jobs of task "bulk": more than two pages


@pytest.fixture
def seeded(db: psycopg.Connection[Any]) -> dict[str, list[int]]:
    ids = seed_every_state(db)
    rows = db.execute(
        "select (graphile_worker.add_job('bulk', json_build_object('n', n), "
        "run_at => now() - make_interval(secs => 1000 - n))).id "
        "from generate_series(1, %s) as n",
        (BULK,),
    ).fetchall()
    ids["bulk"] = [row[0] for row in rows]
    keyed = db.execute(
        "select id from graphile_worker.add_job('email', '{\"customer\": \"acme-42\"}', "
        "job_key => 'order-77')"
    ).fetchone()
    assert keyed is not None
    ids["keyed"] = [keyed[0]]
    return ids


@pytest.fixture
def server(db_url: str, seeded: dict[str, list[int]]) -> Iterator[DashboardServer]:
    items = kongtask.parse_crontab(CRONTAB)
    with DashboardServer(
        db_url, port=0, cron_items=items, cron_lines=source_lines(CRONTAB, items)
    ) as running:
        yield running


@pytest.fixture
def client(server: DashboardServer) -> Client:
    return Client(server.port)


def row_ids(page: str) -> list[int]:
    return [int(found) for found in re.findall(r'<tr data-job-id="(\d+)">', page)]


def page_of(client: Client, path: str) -> str:
    status, _, body = client.request("GET", path)
    assert status == 200, (path, status, body[:300])
    return body


def test_search_finds_by_id_key_payload_and_error_text(
    client: Client, db: psycopg.Connection[Any], seeded: dict[str, list[int]]
) -> None:
    keyed = seeded["keyed"][0]
    assert row_ids(page_of(client, "/jobs?q=order-77")) == [keyed]  # key
    assert row_ids(page_of(client, "/jobs?q=ACME-42")) == [keyed]  # payload text, any case
    assert row_ids(page_of(client, f"/jobs?q={keyed}")) == [keyed]  # id
    failed = sorted(seeded["failed"])
    assert sorted(row_ids(page_of(client, "/jobs?q=mailbox"))) == [failed[1]]  # error text
    assert row_ids(page_of(client, "/jobs?q=reports&state=running")) == seeded["running"]
    # LIKE's wildcards are searched for as written: no job holds a "%" or "_x_".
    assert row_ids(page_of(client, "/jobs?q=%25")) == []
    assert row_ids(page_of(client, "/jobs?q=_x_")) == []
    # Values echoed into the page are escaped.
    body = page_of(client, "/jobs?q=%3Cscript%3Ealert(1)%3C/script%3E")
    assert "<script>alert" not in body and "&lt;script&gt;alert(1)" in body


def test_pages_walk_the_whole_list(client: Client, seeded: dict[str, list[int]]) -> None:
    bulk = seeded["bulk"]  # oldest run_at first, as the list orders them
    seen: list[int] = []
    for page in (1, 2, 3):
        body = page_of(client, f"/jobs?task=bulk&page={page}")
        first = (page - 1) * PAGE_SIZE + 1
        last = min(page * PAGE_SIZE, BULK)
        assert f"Jobs {first}\u2013{last} of {BULK}" in body
        assert f"page {page} of 3" in body
        assert ('rel="next"' in body) == (page < 3) and ('rel="prev"' in body) == (page > 1)
        seen += row_ids(body)
    assert seen == bulk
    second = page_of(client, "/jobs?q=bulk&page=1")  # the search carries over to the next page
    assert 'href="?q=bulk&amp;page=2"' in second
    past = page_of(client, "/jobs?task=bulk&page=9")
    assert row_ids(past) == [] and "page 9 of 3" in past
    for bad in ("0", "-1", "x", "%C2%B2", "9" * 30):
        assert client.request("GET", f"/jobs?page={bad}")[0] == 400, bad


def bulk(client: Client, fields: dict[str, Any], ids: list[int] = ()) -> tuple[int, str]:  # type: ignore[assignment]
    """POST a bulk action (``ids`` as repeated fields); the status and the page or flash."""
    body = "&".join(
        [http_field(k, v) for k, v in {"csrf": client.csrf(), **fields}.items()]
        + [http_field("ids", i) for i in ids]
    )
    conn = http.client.HTTPConnection("127.0.0.1", client.port, timeout=30)
    try:
        conn.request(
            "POST",
            "/actions/bulk",
            body=body,
            headers={
                "Host": f"127.0.0.1:{client.port}",
                "Origin": f"http://127.0.0.1:{client.port}",
                "Content-Type": "application/x-www-form-urlencoded",
                "Cookie": "; ".join(f"{k}={v}" for k, v in client.cookies.items()),
            },
        )
        response = conn.getresponse()
        status, text = response.status, response.read().decode()
        location = response.getheader("location")
    finally:
        conn.close()
    if status == 303:
        assert location is not None
        page = page_of(client, location)
        flash = re.search(r'<div class="flash[^"]*" role="status">([^<]*)</div>', page)
        return status, flash.group(1) if flash else ""
    return status, text


def http_field(name: str, value: Any) -> str:
    return urlencode({name: value})


def test_bulk_on_the_filter_says_how_many_then_acts(
    client: Client, db: psycopg.Connection[Any], seeded: dict[str, list[int]]
) -> None:
    fields = {"op": "fail", "scope": "filter", "task": "bulk", "reason": "stale", "next": "/jobs"}
    status, page = bulk(client, fields)
    assert status == 200
    assert re.search(r'id="confirm-count">Fail 120 jobs matching the search\?', page), page
    assert "Yes, fail 120 jobs" in page
    assert ids_by_sql(db, "failed") == sorted(seeded["failed"])  # asking changed nothing
    status, flash = bulk(client, {**fields, "confirm": "yes"})
    assert (status, flash) == (303, "Fail: 120 of 120 jobs changed")
    assert set(seeded["bulk"]) <= set(ids_by_sql(db, "failed"))
    errors = db.execute(
        "select distinct last_error from graphile_worker._private_jobs where id = any(%s)",
        (seeded["bulk"],),
    ).fetchall()
    assert errors == [("stale",)]
    # On a search: the confirmation counts what the search matches, and so does the action.
    keyed = seeded["keyed"][0]
    page = page_of(client, "/jobs?q=acme-42")
    assert 'name="q" value="acme-42"' in page.split('id="bulk"')[1].split("</form>")[0]
    status, page = bulk(client, {"op": "retry", "scope": "filter", "q": "acme-42"})
    assert "Retry 1 job matching the search?" in page
    status, flash = bulk(
        client,
        {"op": "reschedule", "scope": "filter", "q": "acme-42", "at": "+1h", "confirm": "yes"},
    )
    assert flash == "Reschedule: 1 of 1 jobs changed" and keyed in ids_by_sql(db, "scheduled")
    # A bulk fail without a reason is refused and changes nothing.
    status, flash = bulk(
        client, {"op": "fail", "scope": "filter", "task": "email", "confirm": "yes"}
    )
    assert flash == "Give a reason to fail a job"


def test_bulk_on_a_selection(
    client: Client, db: psycopg.Connection[Any], seeded: dict[str, list[int]]
) -> None:
    failed = seeded["failed"]
    status, page = bulk(client, {"op": "retry", "scope": "selected"}, failed)
    assert status == 200 and "Retry 2 jobs?" in page
    assert f'name="ids" value="{failed[0]}"' in page
    status, flash = bulk(client, {"op": "retry", "scope": "selected", "confirm": "yes"}, failed)
    assert flash == "Retry: 2 of 2 jobs changed"
    assert set(failed) <= set(ids_by_sql(db, "retrying"))

    # Remove: jobs without a key too; a running job is left alone (and the message says so).
    chosen = [*seeded["bulk"][:3], *seeded["running"]]
    status, flash = bulk(client, {"op": "remove", "scope": "selected", "confirm": "yes"}, chosen)
    assert flash == "Remove: 3 of 4 jobs changed (running or gone ones are left alone)"
    left = db.execute(
        "select id from graphile_worker._private_jobs where id = any(%s) order by id", (chosen,)
    ).fetchall()
    assert left == [(seeded["running"][0],)]

    later = seeded["bulk"][3:5]
    fields = {"op": "reschedule", "scope": "selected", "at": "+2h", "confirm": "yes"}
    status, flash = bulk(client, fields, later)
    assert flash == "Reschedule: 2 of 2 jobs changed"
    assert set(later) <= set(ids_by_sql(db, "scheduled"))


def test_forged_or_odd_bulk_requests_are_refused_and_change_nothing(
    client: Client, db: psycopg.Connection[Any], seeded: dict[str, list[int]]
) -> None:
    before = {state: ids_by_sql(db, state) for state in ("failed", "ready", "scheduled")}
    csrf = client.csrf()
    fields = {"op": "remove", "scope": "filter", "confirm": "yes"}
    assert client.post("bulk", {**fields, "csrf": csrf}, Origin="http://evil.example")[0] == 403
    assert client.post("bulk", fields)[0] == 403  # no form token
    assert Client(client.port).post("bulk", {**fields, "csrf": csrf})[0] == 403  # no cookie
    status, _, _ = client.request(
        "POST", "/actions/bulk", {**fields, "csrf": csrf}, Host="rebind.example"
    )
    assert status == 421
    for odd in (
        {"op": "explode", "scope": "filter"},
        {"op": "retry", "scope": "everything"},
        {"op": "retry", "scope": "selected"},  # nothing selected
        {"op": "retry", "scope": "filter", "state": "stuck"},
    ):
        status, body = client.post("bulk", {**odd, "csrf": csrf, "confirm": "yes"})
        assert status == 400 and "Traceback" not in body, (odd, status, body)
    status, body = bulk(client, {"op": "retry", "scope": "selected", "confirm": "yes"}, ["12x"])  # type: ignore[list-item]
    assert status == 400
    assert {state: ids_by_sql(db, state) for state in before} == before


def test_remove_by_id_takes_jobs_without_a_key(
    client: Client, db: psycopg.Connection[Any], seeded: dict[str, list[int]]
) -> None:
    csrf = client.csrf()
    plain = seeded["ready"][0]
    page = page_of(client, f"/jobs?q={plain}")
    row = re.search(rf'<tr data-job-id="{plain}">.*?</tr>', page, re.S)
    assert row and 'action="/actions/remove"' in row.group(0)
    status, flash = client.post("remove", {"csrf": csrf, "job_id": plain, "next": "/jobs"})
    assert (status, flash) == (303, f"Removed job {plain}")
    assert plain not in ids_by_sql(db, "ready")
    running = seeded["running"][0]
    _, flash = client.post("remove", {"csrf": csrf, "job_id": running})
    assert flash == f"Job {running} was not changed: it is running, or no longer exists"
    assert running in ids_by_sql(db, "running")


def test_odd_paths_are_404_and_redirects_stay_in_the_app(
    client: Client, seeded: dict[str, list[int]]
) -> None:
    for path in ("/cron/nosuch", "/cron/%0D%0A", "/jobs/%00", "/static/../app.py", "/jobs/1/x"):
        status, _, body = client.request("GET", path)
        assert status == 404, (path, status, body[:200])
    csrf = client.csrf()
    origin = {"Origin": f"http://127.0.0.1:{client.port}"}
    for hostile in ("//evil.example/", "https://evil.example/", "/\\evil.example"):
        fields = {"csrf": csrf, "op": "retry", "scope": "selected", "ids": 1, "confirm": "yes"}
        status, headers, _ = client.request(
            "POST", "/actions/bulk", {**fields, "next": hostile}, **origin
        )
        assert status == 303 and re.fullmatch(r"/\?flash=[\w-]+", headers["location"]), headers


def test_live_updates_stream_the_counts(
    client: Client, db: psycopg.Connection[Any], seeded: dict[str, list[int]]
) -> None:
    def first_event() -> dict[str, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", client.port, timeout=30)
        try:
            conn.request("GET", "/events", headers={"Host": f"127.0.0.1:{client.port}"})
            response = conn.getresponse()
            assert response.status == 200
            assert response.getheader("content-type", "").startswith("text/event-stream")
            assert "default-src 'none'" in response.getheader("content-security-policy", "")
            seen_event = False
            while True:  # the stream's first lines: retry, then one event (name, data)
                line = response.readline().decode().rstrip("\r\n")
                if line == "event: totals":
                    seen_event = True
                elif seen_event and line.startswith("data: "):
                    return dict(json.loads(line.removeprefix("data: ")))
        finally:
            conn.close()

    before = first_event()["totals"]
    assert before["ready"] == len(ids_by_sql(db, "ready"))
    add(db, "email")
    assert first_event()["totals"]["ready"] == before["ready"] + 1
    page = page_of(client, "/")
    assert 'id="live-toggle"' in page and 'src="/static/dashboard.js"' in page
    status, _, script = client.request("GET", "/static/dashboard.js")
    assert status == 200 and "EventSource" in script


def test_running_jobs_show_pool_host_and_runtime(
    client: Client, db: psycopg.Connection[Any], seeded: dict[str, list[int]]
) -> None:
    running = seeded["running"][0]
    page = page_of(client, "/running")
    row = re.search(rf'<tr data-job-id="{running}">.*?</tr>', page, re.S)
    assert row, page
    assert DEAD_POOL in row.group(0) and "no heartbeat" in row.group(0)
    assert 'action="/actions/cancel"' in row.group(0)
    assert row_ids(page) == ids_by_sql(db, "running")


def test_job_page_lays_out_the_row(
    client: Client, db: psycopg.Connection[Any], seeded: dict[str, list[int]]
) -> None:
    keyed = seeded["keyed"][0]
    db.execute(
        "update graphile_worker._private_jobs set attempts = 1, "
        "last_error = E'Traceback:\\n  line 1\\nValueError: <bad>' where id = %s",
        (keyed,),
    )
    page = page_of(client, f"/jobs/{keyed}")
    assert "<pre>{\n  &#34;customer&#34;: &#34;acme-42&#34;\n}</pre>" in page
    assert '<pre class="err">Traceback:\n  line 1\nValueError: &lt;bad&gt;</pre>' in page
    assert "order-77" in page and "1 of 25 (24 left)" in page


def seed_cron_history(db: psycopg.Connection[Any], job_id: int) -> None:
    db.execute(
        "insert into graphile_worker._kongtask_cron_history (identifier, task, scheduled_at, "
        "outcome, rule, job_id, node, written_at, finished_at, duration_s, attempts, error) "
        "values "
        "('nightly', 'report', now() - interval '3 hours', 'success', null, %(job)s, 'n1', "
        " now() - interval '3 hours' + interval '1.5 seconds', now(), 2.5, 1, null), "
        "('nightly', 'report', now() - interval '2 hours', 'failure', null, null, 'n1', "
        " now() - interval '2 hours' + interval '0.2 seconds', now(), 0.1, 1, "
        " 'boom: <disk full>'), "
        "('nightly', 'report', now() - interval '1 hour', 'skipped', 'noOverlap', null, 'n1', "
        " now() - interval '1 hour', null, null, null, null)",
        {"job": job_id},
    )
    db.execute(
        "insert into graphile_worker._kongtask_cron_gaps (identifier, first_missed, ended_by) "
        "values ('digest', '2026-01-05T09:00:00Z', '2026-01-05T10:00:00Z')"
    )


def test_cron_items_as_written_with_history_lag_and_gaps(
    client: Client, db: psycopg.Connection[Any], seeded: dict[str, list[int]]
) -> None:
    seed_cron_history(db, seeded["ready"][0])
    page = page_of(client, "/cron")
    assert "<code>*/15 9-17 * * 1-5 email ?id=digest</code>" in page  # not expanded
    assert "0,15,30,45" not in page
    nightly = re.search(r'<tr data-cron="nightly">.*?</tr>', page, re.S)
    assert nightly and "200 ms / 1.5 s" in nightly.group(0) and "1 (noOverlap)" in nightly.group(0)
    assert "2026-01-05 09:00:00" in page  # the missed minutes of digest

    item = page_of(client, "/cron/nightly")
    outcomes = re.findall(r'<tr data-outcome="(\w+)">', item)
    assert outcomes == ["skipped", "failure", "success"]  # newest first
    assert "boom: &lt;disk full&gt;" in item and "2.5 s" in item
    assert f'href="/jobs/{seeded["ready"][0]}"' in item

    csrf = client.csrf()
    status, flash = client.post("run_cron", {"csrf": csrf, "identifier": "nightly"})
    match = re.fullmatch(r"Ran cron item nightly now: job (\d+)", flash)
    assert status == 303 and match, flash
    row = db.execute(
        "select t.identifier, j.payload from graphile_worker._private_jobs j join "
        "graphile_worker._private_tasks t on t.id = j.task_id where j.id = %s",
        (int(match.group(1)),),
    ).fetchone()
    assert row is not None and row[0] == "report" and row[1]["_cron"]["backfilled"] is False
    _, flash = client.post("run_cron", {"csrf": csrf, "identifier": "nosuch"})
    assert flash == "No cron item 'nosuch'"


def test_crash_view_lists_dead_pools_and_jobs_under_watch(
    client: Client, db: psycopg.Connection[Any], seeded: dict[str, list[int]]
) -> None:
    suspect = seeded["retrying"][0]
    db.execute(
        "insert into graphile_worker._kongtask_job_crashes (job_id, crashes, last_crash_at) "
        "values (%s, 2, now() - interval '5 minutes'), (999999, 3, now())",
        (suspect,),
    )
    page = page_of(client, "/crashes")
    assert DEAD_POOL in page and "Unlock" in page
    row = re.search(rf'<tr data-job-id="{suspect}">.*?</tr>', page, re.S)
    assert row and '<td class="n">2</td>' in row.group(0) and "SMTP timeout" in row.group(0)
    assert "999999 <span" in page  # a job that is gone, listed without a link


def test_limits_and_pauses_are_set_shown_and_cleared(
    client: Client, db: psycopg.Connection[Any], seeded: dict[str, list[int]]
) -> None:
    csrf = client.csrf()
    page = page_of(client, "/limits")
    assert "No limits are set." in page and "Nothing is paused." in page
    fields = {"csrf": csrf, "kind": "task", "key": "send_email", "next": "/limits"}
    status, flash = client.post("set_limit", {**fields, "concurrency": "3", "rate": "10/m"})
    assert (status, flash) == (303, "Limited task 'send_email': 3 at once, 10/m")
    assert db.execute(
        "select key_kind, key, concurrency from graphile_worker._kongtask_limits"
    ).fetchall() == [("task", "send_email", 3)]
    _, flash = client.post("set_limit", {**fields, "concurrency": "0"})
    assert "concurrency must be a whole number of at least 1" in flash
    _, flash = client.post("set_limit", {**fields, "rate": "fast"})
    assert "is not N/s, N/m, N/h" in flash
    assert db.execute("select concurrency from graphile_worker._kongtask_limits").fetchall() == [
        (3,)
    ]
    status, flash = client.post("pause", {**fields, "kind": "queue", "key": "mail"})
    assert (status, flash) == (303, "Paused queue 'mail' (by dashboard)")
    page = page_of(client, "/limits")
    limit_row = re.search(r'<tr data-limit="task:send_email">.*?</tr>', page, re.S)
    assert (
        limit_row and '<td class="n">3</td>' in limit_row.group(0) and "10/m" in limit_row.group(0)
    )
    pause_row = re.search(r'<tr data-pause="queue:mail">.*?</tr>', page, re.S)
    assert pause_row and "dashboard" in pause_row.group(0) and "Resume" in pause_row.group(0)
    overview = page_of(client, "/")
    assert 'data-paused="queue:mail"' in overview and 'data-limited="task:send_email"' in overview
    status, _ = client.post("pause", {**fields, "kind": "flag"})
    assert status == 400  # flags are limited, never paused
    _, flash = client.post("resume", {**fields, "kind": "queue", "key": "mail"})
    assert flash == "Resumed queue 'mail'"
    _, flash = client.post("clear_limit", fields)
    assert flash == "Cleared the limit on task 'send_email'"
    _, flash = client.post("clear_limit", fields)
    assert flash == "No limit on task 'send_email'"
    assert db.execute("select count(*) from graphile_worker._kongtask_pauses").fetchone() == (0,)
    assert db.execute("select count(*) from graphile_worker._kongtask_limits").fetchone() == (0,)
