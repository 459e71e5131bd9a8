"""Timestamps Python's datetime cannot hold are data, never a crash.

PostgreSQL, graphile-worker's SQL API and any Node app accept ``-infinity``,
``infinity`` and years after 9999 or before 1 (BC) in every timestamptz
column ("as soon as possible" and "never" are common sentinels). The worker
must run a ``-infinity`` job as simply due beside ordinary ones, every
listing and page must render such rows, and kongtask itself must never write
a time it cannot read back.
"""

from __future__ import annotations

import threading
from typing import Any

import psycopg

from kongtask import Runner
from tests.integration.worker_support import add_jobs_sql, locked_queues

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
    ran: dict[int, str] = {}
    lock = threading.Lock()
    all_ran = threading.Event()

    def work(payload: dict[str, Any], helpers: Any) -> None:
        with lock:
            ran[payload["n"]] = str(helpers.job.run_at)
            if set(ran) == expected:
                all_ran.set()

    runner = Runner(
        tasks={"work": work},
        connection_string=db_url,
        concurrency=4,
        local_queue_size=50,  # one claim takes them all
        install_signal_handlers=False,
    )
    with runner:
        assert all_ran.wait(20), f"jobs did not run: {sorted(expected - set(ran))}"
        runner.join(20)
        assert runner.running, "the worker stopped"
    assert set(ran) == expected
    assert ran[-1] == "-infinity"
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
    ran: set[int] = set()
    lock = threading.Lock()
    all_ran = threading.Event()

    def work(payload: dict[str, Any], helpers: Any) -> None:
        with lock:
            ran.add(payload["n"])
            if len(ran) == ORDINARY:
                all_ran.set()

    runner = Runner(
        tasks={"work": work},
        connection_string=db_url,
        concurrency=4,
        local_queue_size=50,
        install_signal_handlers=False,
    )
    with runner:
        assert all_ran.wait(20), f"ordinary jobs did not run: {sorted(ran)}"
        runner.join(20)
        assert runner.running, "the worker stopped"
    assert ran == set(range(ORDINARY))
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
