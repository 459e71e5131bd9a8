"""A payload PostgreSQL accepts but Python's json cannot decode fails only its own job.

PostgreSQL (and Node) accept a number of 5,000 digits or an object nested
3,000 deep; Python's ``json`` refuses the first (the integer digit limit) and
overflows its recursion limit on the second. Such a job, claimed in the same
batch as ten innocent ones, must become a failed attempt with a clear
``last_error`` while the ten run, the worker keeps going, and nothing stays
locked.
"""

from __future__ import annotations

from typing import Any

import psycopg

from tests.integration.worker_support import add_jobs_sql, locked_queues, run_until_ran

INNOCENT = 10

BAD_PAYLOADS = {
    "digits": (
        "select graphile_worker.add_job('work', ('{\"i\": ' || repeat('9', 5000) || '}')::json)"
    ),
    "nesting": (
        "select graphile_worker.add_job('work', "
        "(repeat('{\"a\": ', 3000) || '1' || repeat('}', 3000))::json, queue_name => 'q')"
    ),
}


def test_undecodable_payloads_fail_only_their_job(db_url: str, db: psycopg.Connection[Any]) -> None:
    for statement in BAD_PAYLOADS.values():
        db.execute(statement)
    add_jobs_sql(db, [{"identifier": "work", "payload": {"n": n}} for n in range(INNOCENT)])
    assert set(run_until_ran(db_url, set(range(INNOCENT)))) == set(range(INNOCENT))
    rows = db.execute(
        "select attempts, locked_by, last_error from graphile_worker._private_jobs order by id"
    ).fetchall()
    assert len(rows) == len(BAD_PAYLOADS)
    for attempts, locked_by, last_error in rows:
        assert (attempts, locked_by) == (1, None)
        assert last_error.startswith("Payload could not be decoded: "), last_error
    digits_error, nesting_error = (row[2] for row in rows)
    assert "ValueError" in digits_error and "digits" in digits_error
    assert "RecursionError" in nesting_error
    assert locked_queues(db) == 0
