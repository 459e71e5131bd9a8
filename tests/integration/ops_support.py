"""Seeding a database with jobs in every state, and counting them back with plain SQL.

The counting queries here are written independently of kongtask's own (the
``job_state`` fragment in kongtask/db/sql/ops.sql), from graphile-worker's column
meanings, so a test comparing the two catches a wrong state rule on either side.
"""

from __future__ import annotations

from typing import Any

import psycopg

# Each state as a where clause over graphile_worker._private_jobs j.
STATE_WHERE = {
    "running": "j.locked_at is not null",
    "failed": "j.locked_at is null and j.attempts >= j.max_attempts",
    "retrying": "j.locked_at is null and j.attempts > 0 and j.attempts < j.max_attempts",
    "scheduled": "j.locked_at is null and j.attempts = 0 and j.run_at > now()",
    "ready": "j.locked_at is null and j.attempts = 0 and j.run_at <= now()",
}

DEAD_POOL = "pool-dead00000000000000"
LIVE_POOL = "pool-11111111111111aaaa"
STALE_POOL = "pool-22222222222222bbbb"


def add(conn: psycopg.Connection[Any], task: str, **columns: Any) -> int:
    """Add a job through the schema's add_job; returns its id."""
    row = conn.execute(
        "select id from graphile_worker.add_job(%(task)s, '{}'::json, %(queue)s, "
        "coalesce(%(run_at)s::timestamptz, now()), %(max_attempts)s::int)",
        {
            "task": task,
            "queue": columns.get("queue"),
            "run_at": columns.get("run_at"),
            "max_attempts": columns.get("max_attempts", 25),
        },
    ).fetchone()
    assert row is not None
    return int(row[0])


def seed_every_state(conn: psycopg.Connection[Any]) -> dict[str, list[int]]:
    """Jobs of tasks ``email`` and ``report`` (some in queue ``reports``) in every state.

    One ``report`` job is held by a dead pool together with its queue. Also
    writes a live and a stale heartbeat row and a known cron identifier.
    """
    ids: dict[str, list[int]] = {state: [] for state in STATE_WHERE}
    for _ in range(3):
        ids["ready"].append(add(conn, "email"))
    ids["ready"].append(add(conn, "report", queue="reports"))
    for _ in range(2):
        ids["scheduled"].append(add(conn, "email", run_at="2999-01-01T00:00:00Z"))
    retrying = add(conn, "email", max_attempts=5)
    conn.execute(
        "update graphile_worker._private_jobs set attempts = 2, last_error = 'SMTP timeout', "
        "run_at = now() + interval '1 hour', updated_at = now() where id = %s",
        (retrying,),
    )
    ids["retrying"].append(retrying)
    # Failed once and due again already: still "retrying", not "ready".
    due_again = add(conn, "report")
    conn.execute(
        "update graphile_worker._private_jobs set attempts = 1, last_error = 'timeout', "
        "run_at = now() - interval '1 minute', updated_at = now() where id = %s",
        (due_again,),
    )
    ids["retrying"].append(due_again)
    for reason in ("bad address", "mailbox full"):
        job = add(conn, "email", max_attempts=3)
        conn.execute(
            "update graphile_worker._private_jobs set attempts = 3, last_error = %s, "
            "updated_at = now() where id = %s",
            (reason, job),
        )
        ids["failed"].append(job)
    running = add(conn, "report", queue="reports")
    conn.execute(
        "update graphile_worker._private_jobs set attempts = 1, locked_at = now(), "
        "locked_by = %s where id = %s",
        (DEAD_POOL, running),
    )
    conn.execute(
        "update graphile_worker._private_job_queues set locked_at = now(), locked_by = %s "
        "where queue_name = 'reports'",
        (DEAD_POOL,),
    )
    ids["running"].append(running)
    conn.execute(
        "insert into graphile_worker._kongtask_pools "
        "(pool_id, hostname, pid, concurrency, started_at, last_seen, version) values "
        "(%s, 'web-1', 4242, 4, now() - interval '1 hour', now(), 'test'), "
        "(%s, 'web-2', 4343, 2, now() - interval '2 hours', now() - interval '10 minutes', 'test')",
        (LIVE_POOL, STALE_POOL),
    )
    conn.execute(
        "insert into graphile_worker._private_known_crontabs (identifier, known_since, "
        "last_execution) values ('nightly', now() - interval '2 days', "
        "'2026-01-01T03:00:00Z') on conflict (identifier) do update set "
        "last_execution = excluded.last_execution"
    )
    return ids


def counts_by_sql(conn: psycopg.Connection[Any]) -> dict[tuple[str, str], int]:
    """(task, state) -> count, for every state, by the independent where clauses."""
    result: dict[tuple[str, str], int] = {}
    for state, where in STATE_WHERE.items():
        rows = conn.execute(
            "select t.identifier, count(*) from graphile_worker._private_jobs j "
            "join graphile_worker._private_tasks t on t.id = j.task_id "
            f"where {where} group by t.identifier"
        ).fetchall()
        for task, count in rows:
            result[(task, state)] = count
    return result


def ids_by_sql(conn: psycopg.Connection[Any], state: str) -> list[int]:
    """Ids of the jobs in ``state``, by the independent where clause."""
    rows = conn.execute(
        f"select j.id from graphile_worker._private_jobs j where {STATE_WHERE[state]} order by j.id"
    ).fetchall()
    return [row[0] for row in rows]
