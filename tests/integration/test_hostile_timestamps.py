"""Timestamps Python's datetime cannot hold are data, never a crash.

PostgreSQL, graphile-worker's SQL API and any Node app accept ``-infinity``,
``infinity`` and years after 9999 or before 1 (BC) in every timestamptz
column ("as soon as possible" and "never" are common sentinels). The worker
must run a ``-infinity`` job as simply due beside ordinary ones, every
listing and page must render such rows, and kongtask itself must never write
a time it cannot read back.
"""

from __future__ import annotations

import html
import json
import re
import threading
import urllib.request
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool

from kongtask import InvalidJobError, JobSpec, Runner, WorkerUtils
from kongtask.ops.cli.cron import main as cron_main
from kongtask.ops.cli.jobs import jobs_main, status_main
from kongtask.ops.cli.main import main as cli_main
from kongtask.ops.dashboard import DashboardServer
from tests.integration.cron_support import T0, NodeFactory, job_minutes
from tests.integration.ops_support import add
from tests.integration.test_dashboard_http import Client
from tests.integration.worker_support import (
    add_jobs_sql,
    locked_queues,
    run_until_ran,
    wait_until,
)

ORDINARY = 10


def test_minus_infinity_job_runs_beside_ordinary_ones(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    """Case 1: '-infinity' heads the claim; it and the ten behind it run, nothing stays locked."""
    db.execute("select graphile_worker.add_job('work', '{\"n\": -1}', run_at => '-infinity')")
    # Hostile bookkeeping columns written by another application load too.
    db.execute(
        "select graphile_worker.add_job('work', '{\"n\": -2}', run_at => now() - interval '1s')"
    )
    db.execute(
        "update graphile_worker._private_jobs set created_at = '-infinity', "
        "updated_at = '20000-01-01 00:00:00+00' where payload->>'n' = '-2'"
    )
    # 'infinity' means never: it must neither run nor stop the others.
    db.execute("select graphile_worker.add_job('work', '{\"n\": -3}', run_at => 'infinity')")
    add_jobs_sql(db, [{"identifier": "work", "payload": {"n": n}} for n in range(ORDINARY)])
    expected = {-1, -2, *range(ORDINARY)}
    ran = run_until_ran(db_url, expected)
    assert set(ran) == expected
    assert str(ran[-1].run_at) == "-infinity"
    rows = db.execute(
        "select payload->>'n', run_at::text, attempts, locked_by "
        "from graphile_worker._private_jobs order by id"
    ).fetchall()
    assert rows == [("-3", "infinity", 0, None)]
    assert locked_queues(db) == 0


def test_a_claimed_row_that_cannot_be_loaded_fails_alone(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    """A claimed row no loader reads (flags holding a 5,000-digit number) fails only its job."""
    db.execute("select graphile_worker.add_job('work', '{\"n\": -1}', queue_name => 'q')")
    db.execute(
        "update graphile_worker._private_jobs "
        "set flags = ('{\"x\": ' || repeat('9', 5000) || '}')::jsonb"
    )
    add_jobs_sql(db, [{"identifier": "work", "payload": {"n": n}} for n in range(ORDINARY)])
    assert set(run_until_ran(db_url, set(range(ORDINARY)))) == set(range(ORDINARY))
    rows = db.execute(
        "select payload->>'n', attempts, locked_by, last_error "
        "from graphile_worker._private_jobs order by id"
    ).fetchall()
    assert len(rows) == 1
    n, attempts, locked_by, last_error = rows[0]
    assert (n, attempts, locked_by) == ("-1", 1, None)
    assert last_error.startswith("Row could not be read: ValueError: "), last_error
    assert "digits" in last_error
    assert locked_queues(db) == 0


def _seed_far_rows(db: psycopg.Connection[Any]) -> dict[str, int]:
    """Rows another application wrote with times Python cannot hold, by raw SQL."""

    def add(sql: str) -> int:
        row = db.execute(sql).fetchone()
        assert row is not None
        return int(row[0])

    never = add("select id from graphile_worker.add_job('far', '{}', run_at => 'infinity')")
    y10k = add(
        "select id from graphile_worker.add_job('far', '{}', queue_name => 'later', "
        "run_at => '10000-01-01 04:00:00+00')"
    )
    db.execute(
        "update graphile_worker._private_jobs set created_at = '-infinity', "
        "updated_at = '0044-03-15 12:00:00+00 BC' where id = %s",
        (y10k,),
    )
    held = add("select id from graphile_worker.add_job('far', '{}', queue_name => 'held')")
    db.execute(
        "update graphile_worker._private_jobs set attempts = 1, locked_by = 'node-worker-1', "
        "locked_at = 'infinity' where id = %s",
        (held,),
    )
    db.execute(
        "update graphile_worker._private_job_queues set locked_by = 'node-worker-1', "
        "locked_at = '-infinity' where queue_name = 'held'"
    )
    db.execute(
        "insert into graphile_worker._private_known_crontabs values "
        "('nightly', '-infinity', 'infinity')"
    )
    db.execute(
        "insert into graphile_worker._kongtask_cron_history "
        "(identifier, task, scheduled_at, node, written_at, finished_at) values "
        "('nightly', 'far', '10000-01-01 04:00:00+00', 'node-x', '-infinity', 'infinity')"
    )
    return {"never": never, "y10k": y10k, "held": held}


Y10K = "10000-01-01T04:00:00+00:00"
IDES = "0044-03-15T12:00:00+00:00 BC"


def test_far_times_render_in_every_listing(
    db_url: str, db: psycopg.Connection[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """Case 2: 'infinity' and years 10000 / 44 BC show as such in the CLI's views."""
    ids = _seed_far_rows(db)

    def run(main: Any, *argv: str) -> str:
        assert main(["-c", db_url, *argv]) == 0
        return capsys.readouterr().out

    listing = run(jobs_main, "list")
    lines = {int(line.split()[0]): line for line in listing.splitlines()[1:]}
    assert lines[ids["never"]].split()[5] == "infinity"
    assert Y10K in lines[ids["y10k"]]
    by_id = {job["id"]: job for job in json.loads(run(jobs_main, "list", "--json"))}
    assert by_id[ids["never"]]["run_at"] == "infinity"
    assert by_id[ids["y10k"]]["created_at"] == "-infinity"
    assert by_id[ids["held"]]["locked_at"] == "infinity"

    shown = run(jobs_main, "show", str(ids["y10k"]))
    assert f"run at:        {Y10K}" in shown
    assert "created at:    -infinity" in shown
    assert f"updated at:    {IDES}" in shown
    assert "since infinity" in run(jobs_main, "show", str(ids["held"]))
    detail = json.loads(run(jobs_main, "show", str(ids["never"]), "--json"))
    assert detail["run_at"] == "infinity" and detail["state"] == "scheduled"

    status = run(status_main)
    assert "held by node-worker-1 since -infinity" in status
    assert re.search(r"nightly\s+-\s+infinity", status), status
    cron = json.loads(run(status_main, "--json"))["cron"]
    assert cron == [
        {
            "identifier": "nightly",
            "task": None,
            "spec": None,
            "known_since": "-infinity",
            "last_execution": "infinity",
            "next_firing": None,
        }
    ]

    history = run(cron_main, "history")
    assert history.startswith(f"{Y10K}  nightly  scheduled"), history


def test_far_times_render_on_the_dashboard(db_url: str, db: psycopg.Connection[Any]) -> None:
    """Case 2: the dashboard's overview, job list and job pages render such rows."""
    ids = _seed_far_rows(db)
    with DashboardServer(db_url, port=0) as server:
        client = Client(server.port)
        status, _, overview = client.request("GET", "/")
        assert status == 200, overview
        assert "since -infinity" in overview
        # The cron item last fired at 'infinity' (its history row has infinite times too:
        # no lag can be computed, and none is shown).
        cron_row = re.search(r'<tr data-cron="nightly">.*?</tr>', overview, re.S)
        assert cron_row and "<td>infinity</td>" in cron_row.group(0), overview
        assert "- / -" in cron_row.group(0)
        status, _, listing = client.request("GET", "/jobs")
        assert status == 200, listing
        assert html.escape(Y10K) in listing
        for job_id, shown in (
            (ids["never"], "infinity"),
            (ids["y10k"], html.escape(IDES)),
            (ids["held"], "since infinity"),
        ):
            status, _, page = client.request("GET", f"/jobs/{job_id}")
            assert status == 200, page
            assert shown in page


# Times kongtask must refuse to write: each is beyond year 9999 in UTC.
FAR_AT = ("9999-12-31T23:00-05:00", "9999-12-31T23:59-01:00", "+99999999w")
# A log record on stderr (the CLI logs which database it uses).
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\dT\S+ \[kongtask")


def _row(db: psycopg.Connection[Any], job_id: int) -> tuple[Any, ...]:
    row = db.execute(
        "select run_at::text, updated_at::text, revision, attempts "
        "from graphile_worker._private_jobs where id = %s",
        (job_id,),
    ).fetchone()
    assert row is not None
    return tuple(row)


def test_reschedule_refuses_times_it_could_not_read_back(
    db_url: str, db: psycopg.Connection[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """Case 3: `jobs reschedule --at` beyond year 9999 (UTC) is one clear line; nothing changes."""
    job_id = add(db, "work", run_at="2030-01-01T00:00:00Z")
    before = _row(db, job_id)
    for at in FAR_AT:
        code = cli_main(["jobs", "-c", db_url, "reschedule", str(job_id), "--at", at])
        out, err = capsys.readouterr()
        assert code == 1 and out == "", (at, out, err)
        lines = [line for line in err.splitlines() if not LOG_RECORD.match(line)]
        assert len(lines) == 1, err
        assert lines[0].startswith("kongtask: error: --at: "), err
        assert "after year 9999 in UTC" in lines[0] and "unexpected" not in lines[0], err
        assert _row(db, job_id) == before
    # The last minute kongtask writes is still accepted, and read back as written.
    assert (
        cli_main(["jobs", "-c", db_url, "reschedule", str(job_id), "--at", "9999-12-31T23:59Z"])
        == 0
    )
    assert _row(db, job_id)[0] == "9999-12-31 23:59:00+00"
    capsys.readouterr()


def test_api_refuses_times_it_could_not_read_back(db_url: str, db: psycopg.Connection[Any]) -> None:
    """Case 3: add_job, add_jobs, reschedule_jobs and JobSpec refuse them; nothing is written."""
    job_id = add(db, "work", run_at="2030-01-01T00:00:00Z")
    before = _row(db, job_id)
    year_10000 = datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-5)))
    year_0 = datetime(1, 1, 1, 1, tzinfo=timezone(timedelta(hours=5)))
    with WorkerUtils(db_url) as utils:
        for run_at in (year_10000, year_0):
            with pytest.raises(InvalidJobError, match="in UTC") as refused:
                utils.add_job("work", run_at=run_at)
            assert refused.value.field == "run_at"
            with pytest.raises(InvalidJobError, match=r"index 1: run_at: .* in UTC"):
                utils.add_jobs([{"identifier": "work"}, {"identifier": "work", "run_at": run_at}])
            with pytest.raises(InvalidJobError, match="in UTC"):
                utils.reschedule_jobs([job_id], run_at=run_at)
            with pytest.raises(InvalidJobError, match="in UTC"):
                JobSpec("work", run_at=run_at)
        # A value read back from such a row cannot be written back either.
        never = utils.add_job("work")
        db.execute(
            "update graphile_worker._private_jobs set run_at = 'infinity' where id = %s",
            (never.id,),
        )
        infinity = utils.list_jobs()[-1].job.run_at
        assert str(infinity) == "infinity"
        with pytest.raises(InvalidJobError, match="infinity is outside the years 1 to 9999"):
            utils.reschedule_jobs([job_id], run_at=infinity)
    assert _row(db, job_id) == before
    assert db.execute("select count(*) from graphile_worker._private_jobs").fetchone() == (2,)


def test_dashboard_reschedule_refuses_times_it_could_not_read_back(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    """Case 3: the reschedule form refuses them with a message; the pages keep working."""
    job_id = add(db, "work", run_at="2030-01-01T00:00:00Z")
    before = _row(db, job_id)
    with DashboardServer(db_url, port=0) as server:
        client = Client(server.port)
        status, _, page = client.request("GET", f"/jobs/{job_id}")
        found = re.search(r'name="csrf" value="([^"]+)"', page)
        assert status == 200 and found, page
        csrf = found.group(1)
        for at in FAR_AT:
            status, flash = client.post(
                "reschedule", {"job_id": job_id, "at": at, "csrf": csrf, "next": "/jobs"}
            )
            assert status == 303
            assert flash.startswith("the new run time: "), flash
            assert "after year 9999 in UTC" in flash, flash
            assert _row(db, job_id) == before
        for page in ("/", "/jobs", f"/jobs/{job_id}"):
            assert client.request("GET", page)[0] == 200, page


def test_times_python_can_hold_load_in_any_session_time_zone(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    """Year 1 seen from New York is '1 BC' locally, 9999-12-31 from Tokyo is '10000': still data."""
    dbname = conninfo_to_dict(db_url)["dbname"]

    def session_time_zone(zone: str) -> None:
        db.execute(
            sql.SQL("alter database {} set timezone = {}").format(
                sql.Identifier(dbname), sql.Literal(zone)
            )
        )

    session_time_zone("America/New_York")
    first = add(db, "work", run_at="0001-01-01T00:00:00Z")
    last = add(db, "work", run_at="9999-12-31T23:59:59Z")
    seen: list[datetime] = []
    done = threading.Event()

    def work(payload: dict[str, Any], helpers: Any) -> None:
        seen.append(helpers.job.run_at)
        done.set()

    runner = Runner(tasks={"work": work}, connection_string=db_url, install_signal_handlers=False)
    with runner:
        assert done.wait(20), "the year-1 job did not run"
        runner.join(20)
    assert seen == [datetime(1, 1, 1, tzinfo=UTC)]
    assert type(seen[0]) is datetime
    session_time_zone("Asia/Tokyo")
    with WorkerUtils(db_url) as utils:
        info = utils.get_job(last)
        assert info is not None and utils.get_job(first) is None
        assert info.job.run_at == datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
        assert type(info.job.run_at) is datetime


@pytest.mark.parametrize("own_pool", [False, True], ids=["kongtask-pool", "application-pool"])
def test_cron_reads_far_last_executions_as_data(
    db_url: str, db: psycopg.Connection[Any], own_pool: bool
) -> None:
    """Cron state another client wrote: '-infinity' means never ran, 'infinity' never again."""
    db.execute(
        "insert into graphile_worker._private_known_crontabs values "
        "('asap', '-infinity', '-infinity'), ('fresh', '-infinity', null), "
        "('never', '-infinity', 'infinity')"
    )
    nodes = NodeFactory(db_url)
    with ConnectionPool(db_url, min_size=1, max_size=2, kwargs={"autocommit": True}) as pool:
        try:
            # On an application's pool kongtask leaves the connections' loaders alone.
            options: dict[str, Any] = {"pool": pool, "connection_string": None} if own_pool else {}
            node = nodes(
                T0 + timedelta(seconds=30),
                crontab="".join(f"* * * * * {t} ?fill=2m\n" for t in ("asap", "fresh", "never")),
                **options,
            )
            node.start()
            node.advance(31, scheduled=1)
        finally:
            nodes.close()
        with pool.connection() as conn, pytest.raises(psycopg.DataError):
            conn.execute("select 'infinity'::timestamptz").fetchone()
    assert job_minutes(db, "asap") == job_minutes(db, "fresh") == ["23:59", "00:00", "00:01"]
    assert job_minutes(db, "never") == []
    rows = db.execute(
        "select identifier, last_execution::text "
        "from graphile_worker._private_known_crontabs order by 1"
    ).fetchall()
    assert rows == [
        ("asap", "2024-01-01 00:01:00+00"),
        ("fresh", "2024-01-01 00:01:00+00"),
        ("never", "infinity"),
    ]


def test_pickup_latency_leaves_out_minus_infinity(db_url: str, db: psycopg.Connection[Any]) -> None:
    """'-infinity' is no start of a wait: it must not add millennia to the latency histogram."""
    db.execute("select graphile_worker.add_job('work', '{}', run_at => '-infinity')")
    add(db, "work")
    with Runner(
        tasks={"work": lambda payload, helpers: None},
        connection_string=db_url,
        metrics_port=0,
        install_signal_handlers=False,
    ) as runner:
        runner.join(20)
        assert runner.ops_server is not None
        url = runner.ops_server.url + "/metrics"

        def pickup() -> dict[str, float]:
            with urllib.request.urlopen(url, timeout=10) as response:
                text = response.read().decode()
            return {
                sample.name: sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.name.startswith("kongtask_job_pickup_latency_seconds_")
                and sample.labels.get("task") == "work"
            }

        wait_until(lambda: pickup().get("kongtask_job_pickup_latency_seconds_count") == 1)
        assert pickup()["kongtask_job_pickup_latency_seconds_sum"] < 60
    assert db.execute("select count(*) from graphile_worker._private_jobs").fetchone() == (0,)
