"""The bulk path of ``add_jobs`` (binary COPY) against the schema's own ``add_jobs``.

Batches of ``BULK_MIN_SPECS`` or more keyless specs skip the schema's
``add_jobs`` function; these tests hold the bulk path to that function's
effects, in one database: the same rows column by column, task and queue rows
created as needed, one ``jobs:insert`` notification per batch with the same
payload, the returned jobs equal to what was stored, keyed specs still taking
the exact path, the caller's transaction respected, and bad input refused
with nothing written.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from kongtask import InvalidJobError, JobSpec, WorkerUtils, add_jobs_async
from kongtask.db.statements import Queries
from kongtask.job import Job
from kongtask.jobs.bulk import BULK_MIN_SPECS
from kongtask.jobs.enqueue import add_job_specs_on

T0 = datetime(2030, 1, 1, 12, 30, 15, 123456, tzinfo=UTC)
SCHEMA = "graphile_worker"

#: Every column add_jobs decides (all but the id and the two timestamps now() fills).
COLUMNS = (
    "tasks.identifier, queues.queue_name, jobs.payload::text as payload, jobs.priority, "
    "jobs.run_at, jobs.attempts, jobs.max_attempts, jobs.last_error, jobs.key, jobs.locked_at, "
    "jobs.locked_by, jobs.revision, jobs.flags, jobs.is_available"
)


def mixed_specs(count: int, tag: str) -> list[dict[str, Any]]:
    """Specs touching every field add_jobs fills in or defaults, on new tasks and queues."""
    payloads: list[Any] = [{"n": 0}, [1, "two", None], "text", 3.5, None, {"é": "ü\u2028"}, []]
    specs = []
    for n in range(count):
        spec: dict[str, Any] = {
            "identifier": f"{tag}_task_{n % 3}",
            "payload": payloads[n % len(payloads)],
        }
        if n % 2:
            spec["queue_name"] = f"{tag}_queue_{n % 4}"
        if n % 5 == 0:
            spec["run_at"] = T0 + timedelta(seconds=n)
        if n % 5 == 1:  # another zone: stored as the same instant
            spec["run_at"] = (T0 + timedelta(seconds=n)).astimezone(timezone(timedelta(hours=-7)))
        if n % 3 == 0:
            spec["max_attempts"] = 1 + n % 7
        if n % 4 == 0:
            spec["priority"] = n % 11 - 5
        if n % 6 == 0:
            spec["flags"] = ["a", "b", "a"]
        elif n % 6 == 1:
            spec["flags"] = []
        specs.append(spec)
    return specs


def schema_add_jobs(conn: psycopg.Connection[Any], specs: list[dict[str, Any]]) -> None:
    """The same specs through the schema's add_jobs, as Node's addJobs sends them."""
    text = "[" + ",".join(JobSpec.coerce(spec).json_spec_text() for spec in specs) + "]"
    conn.execute(
        "select count(*) from graphile_worker.add_jobs(array("
        "select json_populate_recordset(null::graphile_worker.job_spec, %s::json)))",
        (text,),
    )


def stored(conn: psycopg.Connection[Any], ids: list[int]) -> list[dict[str, Any]]:
    """The rows of ``ids`` in that order, with task identifier and queue name."""
    with conn.cursor(row_factory=dict_row) as cursor:
        return cursor.execute(
            f"select {COLUMNS}, jobs.id, jobs.created_at, jobs.updated_at "
            "from unnest(%s::bigint[]) with ordinality as wanted(id, ord) "
            "join graphile_worker._private_jobs as jobs on jobs.id = wanted.id "
            "join graphile_worker._private_tasks as tasks on tasks.id = jobs.task_id "
            "left join graphile_worker._private_job_queues as queues "
            "on queues.id = jobs.job_queue_id order by wanted.ord",
            (ids,),
        ).fetchall()


def decided(row: dict[str, Any]) -> dict[str, Any]:
    """A row without the id and the timestamps now() fills."""
    return {k: v for k, v in row.items() if k not in ("id", "created_at", "updated_at")}


def same_as_stored(conn: psycopg.Connection[Any], jobs: list[Job]) -> None:
    """The returned jobs are exactly the stored rows, field by field."""
    with conn.cursor(row_factory=dict_row) as cursor:
        rows = cursor.execute(
            "select jobs.*, tasks.identifier from graphile_worker._private_jobs as jobs "
            "join graphile_worker._private_tasks as tasks on tasks.id = jobs.task_id "
            "where jobs.id = any(%s) order by jobs.id",
            ([job.id for job in jobs],),
        ).fetchall()
    by_id = {row["id"]: Job.from_row(row, row["identifier"]) for row in rows}
    assert len(by_id) == len(jobs)
    for job in jobs:
        assert job == by_id[job.id]


def new_rows_of_schema_path(conn: psycopg.Connection[Any], since: int) -> list[dict[str, Any]]:
    ids = [
        row[0]
        for row in conn.execute(
            "select id from graphile_worker._private_jobs where id > %s order by id", (since,)
        )
    ]
    return stored(conn, ids)


@pytest.mark.parametrize("kind", ["mixed", "plain"])
def test_bulk_rows_equal_the_schema_add_jobs_rows(db_url: str, kind: str) -> None:
    count = BULK_MIN_SPECS * 2 + 5
    if kind == "mixed":
        specs = mixed_specs(count, "bulk")
    else:  # the three-column COPY: nothing but identifier and payload
        specs = [{"identifier": f"plain_{n % 2}", "payload": {"n": n}} for n in range(count)]
    with WorkerUtils(db_url) as utils:
        jobs = utils.add_jobs(specs)
    with psycopg.connect(db_url, autocommit=True) as conn:
        bulk_rows = stored(conn, [job.id for job in jobs])
        # Same identifiers and queue names: the schema's path now finds the rows.
        last = max(job.id for job in jobs)
        with conn.transaction():
            schema_add_jobs(conn, specs)
            now = conn.execute("select now()").fetchone()
        schema_rows = new_rows_of_schema_path(conn, last)
        same_as_stored(conn, jobs)
    assert len(bulk_rows) == len(schema_rows) == count
    for index, (ours, theirs) in enumerate(zip(bulk_rows, schema_rows, strict=True)):
        spec = specs[index]
        if "run_at" not in spec:  # now() of each transaction: compare it to that
            assert ours["run_at"] == ours["created_at"]
            assert theirs["run_at"] == (now[0] if now else None)
            ours = {**ours, "run_at": None}
            theirs = {**theirs, "run_at": None}
        assert decided(ours) == decided(theirs), f"spec {index}: {spec}"
        assert ours["created_at"] == ours["updated_at"] == jobs[0].created_at
    # Ids in input order, from the table's own sequence.
    ids = [job.id for job in jobs]
    assert ids == sorted(ids) and len(set(ids)) == count
    assert [job.task_identifier for job in jobs] == [spec["identifier"] for spec in specs]


def test_task_and_queue_rows_are_created_once(db_url: str) -> None:
    specs = mixed_specs(BULK_MIN_SPECS, "fresh")
    with WorkerUtils(db_url) as utils:
        utils.add_jobs(specs)
        utils.add_jobs(specs)
    with psycopg.connect(db_url, autocommit=True) as conn:
        tasks = conn.execute(
            "select identifier from graphile_worker._private_tasks order by identifier"
        ).fetchall()
        queues = conn.execute(
            "select queue_name from graphile_worker._private_job_queues order by queue_name"
        ).fetchall()
        jobs = conn.execute("select count(*) from graphile_worker.jobs").fetchone()
    assert tasks == [(f"fresh_task_{n}",) for n in range(3)]
    assert queues == [(f"fresh_queue_{n}",) for n in (1, 3)]
    assert jobs == (2 * len(specs),)


def notifications_until_marker(listener: psycopg.Connection[Any], marker: str) -> list[str]:
    """Payloads on ``jobs:insert`` up to the marker this test sent last (commit order)."""
    payloads: list[str] = []
    for notify in listener.notifies(timeout=30):
        if notify.payload == marker:
            return payloads
        payloads.append(notify.payload)
    raise AssertionError(f"the marker notification never came; got {payloads}")


def send_marker(conn: psycopg.Connection[Any], marker: str) -> None:
    conn.execute("select pg_notify('jobs:insert', %s)", (marker,))


def test_one_notification_per_batch_with_the_schema_payload(db_url: str) -> None:
    count = BULK_MIN_SPECS * 3
    with (
        psycopg.connect(db_url, autocommit=True) as listener,
        psycopg.connect(db_url, autocommit=True) as conn,
    ):
        listener.execute('listen "jobs:insert"')
        with WorkerUtils(db_url) as utils:
            utils.add_jobs([{"identifier": "woken", "payload": {"n": n}} for n in range(count)])
        send_marker(conn, "marker-1")
        ours = notifications_until_marker(listener, "marker-1")
        schema_add_jobs(conn, [{"identifier": "woken"}] * count)
        send_marker(conn, "marker-2")
        theirs = notifications_until_marker(listener, "marker-2")
    assert len(ours) == len(theirs) == 1
    ours_payload, theirs_payload = json.loads(ours[0]), json.loads(theirs[0])
    assert set(ours_payload) == set(theirs_payload) == {"r", "count"}
    assert ours_payload["count"] == theirs_payload["count"] == count
    assert 0 <= ours_payload["r"] < 1


def test_keyed_specs_keep_the_exact_path_in_input_order(db_url: str) -> None:
    plain = [{"identifier": "mixed", "payload": {"n": n}} for n in range(BULK_MIN_SPECS)]
    with WorkerUtils(db_url) as utils:
        first = utils.add_job("mixed", [1], job_key="k1", run_at=T0)
        specs: list[dict[str, Any]] = [
            *plain[:10],
            {"identifier": "mixed", "payload": [2], "job_key": "k1", "run_at": T0 + timedelta(1)},
            *plain[10:],
            {"identifier": "mixed", "payload": {"keyed": 2}, "job_key": "k2"},
        ]
        jobs = utils.add_jobs(specs, job_key_preserve_run_at=True)
    assert [job.key for job in jobs] == [spec.get("job_key") for spec in specs]
    # The keyed job was updated in place: arrays appended, run_at preserved.
    assert jobs[10].id == first.id and jobs[10].payload == [1, 2] and jobs[10].run_at == T0
    assert jobs[10].revision == 1
    assert [job.payload for job in jobs if job.key is None] == [s["payload"] for s in plain]
    with psycopg.connect(db_url, autocommit=True) as conn:
        same_as_stored(conn, [job for job in jobs if job.key is None])
        count = conn.execute("select count(*) from graphile_worker._private_jobs").fetchone()
    assert count == (len(plain) + 2,)


def job_count(db: psycopg.Connection[Any]) -> int:
    row = db.execute("select count(*) from graphile_worker._private_jobs").fetchone()
    assert row is not None
    return int(row[0])


def test_the_callers_transaction_decides(db_url: str, db: psycopg.Connection[Any]) -> None:
    specs = [{"identifier": "txn", "payload": {"n": n}} for n in range(BULK_MIN_SPECS)]
    db.execute('listen "jobs:insert"')
    with psycopg.connect(db_url) as conn:  # not autocommit: the caller's transaction
        kongtask_add_jobs(conn, specs)
        conn.rollback()
        jobs = kongtask_add_jobs(conn, specs)
        assert job_count(db) == 0  # not visible before the caller commits
        conn.commit()
    assert job_count(db) == len(jobs) == len(specs)
    send_marker(db, "after")
    # Only the committed batch notified.
    assert len(notifications_until_marker(db, "after")) == 1


def kongtask_add_jobs(conn: psycopg.Connection[Any], specs: list[dict[str, Any]]) -> list[Job]:
    from kongtask import add_jobs

    return add_jobs(specs, connection=conn)


def test_a_bad_spec_at_the_end_changes_nothing(db_url: str, db: psycopg.Connection[Any]) -> None:
    specs: list[dict[str, Any]] = [{"identifier": "ok", "payload": {"n": n}} for n in range(100)]
    specs.append({"identifier": "ok", "payload": {"bad": float("nan")}})
    db.execute('listen "jobs:insert"')
    with WorkerUtils(db_url) as utils:
        with pytest.raises(InvalidJobError, match="job spec at index 100: payload"):
            utils.add_jobs(specs)
        with pytest.raises(InvalidJobError, match="job spec at index 64: max_attempts"):
            utils.add_jobs([*specs[:64], {"identifier": "ok", "max_attempts": 0}])
    send_marker(db, "after")
    assert notifications_until_marker(db, "after") == []
    assert db.execute("select count(*) from graphile_worker._private_jobs").fetchone() == (0,)
    assert db.execute("select count(*) from graphile_worker._private_tasks").fetchone() == (0,)


def test_async_connections_take_the_bulk_path(db_url: str) -> None:
    specs = mixed_specs(BULK_MIN_SPECS + 1, "async")

    async def add() -> list[Job]:
        async with await psycopg.AsyncConnection.connect(db_url) as conn:
            jobs = await add_jobs_async(specs, connection=conn)
            await conn.commit()
            return jobs

    jobs = asyncio.run(add())
    with psycopg.connect(db_url, autocommit=True) as conn:
        same_as_stored(conn, jobs)
    assert [job.task_identifier for job in jobs] == [spec["identifier"] for spec in specs]


def test_cron_writers_door_takes_the_bulk_path_for_its_keyless_specs(db_url: str) -> None:
    specs = [JobSpec("cron_like", {"n": n}, run_at=T0) for n in range(BULK_MIN_SPECS)]
    specs.append(JobSpec("cron_like", {"n": "keyed"}, run_at=T0, job_key="once"))
    with psycopg.connect(db_url) as conn, conn.transaction():
        jobs = add_job_specs_on(conn, Queries(SCHEMA), specs)
    assert [job.payload["n"] for job in jobs] == [*range(BULK_MIN_SPECS), "keyed"]
    with psycopg.connect(db_url, autocommit=True) as conn:
        same_as_stored(conn, jobs)


def test_an_odd_schema_name_reaches_its_own_sequence(empty_db_url: str) -> None:
    schema = 'Bulk "odd" schema'
    count = BULK_MIN_SPECS + 4
    specs = [{"identifier": "t", "payload": {"n": n}, "queue_name": "q"} for n in range(count)]
    with WorkerUtils(empty_db_url, schema=schema) as utils:
        jobs = utils.add_jobs(specs)
        later = utils.add_job("t")
    # The ids came from this schema's jobs sequence: the next job follows them.
    assert [job.id for job in jobs] == list(range(1, count + 1)) and later.id == count + 1
    assert {job.task_identifier for job in jobs} == {"t"}
