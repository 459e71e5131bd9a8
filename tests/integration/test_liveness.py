"""A pool's liveness record: written before claiming, beating on database time, gone at a stop."""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime
from typing import Any

import psycopg

from kongtask.jobs.liveness import pool_lock_key
from kongtask.runner import Runner
from kongtask.testing import ManualClock
from tests.faults.ledger import scalar, wait_until

POOLS = "select pool_id, hostname, pid, concurrency, started_at, last_seen, version " + (
    "from graphile_worker._kongtask_pools"
)


def _runner(db_url: str, **options: Any) -> Runner:
    options.setdefault("install_signal_handlers", False)
    return Runner(tasks={"t": lambda payload, helpers: None}, connection_string=db_url, **options)


def test_record_lives_from_start_to_clean_stop(db_url: str, db: psycopg.Connection[Any]) -> None:
    # A manual clock never moves here: the heartbeat runs on real time all the same.
    runner = _runner(
        db_url,
        concurrency=3,
        heartbeat_interval_s=0.2,
        pool_dead_after_s=5,
        clock=ManualClock(datetime(2030, 1, 1, tzinfo=UTC)),
    ).start()
    try:
        rows = db.execute(POOLS).fetchall()
        assert len(rows) == 1
        pool_id, hostname, pid, concurrency, started_at, first_seen, version = rows[0]
        assert (pool_id, hostname, pid, concurrency) == (
            runner.pool_id,
            socket.gethostname(),
            os.getpid(),
            3,
        )
        assert version and started_at <= first_seen
        wait_until(
            lambda: (
                scalar(db, "select last_seen from graphile_worker._kongtask_pools") > first_seen
            ),
            timeout_s=10,
            what="a heartbeat",
        )
        # Declared dead by someone else (the record deleted): it registers again.
        db.execute("delete from graphile_worker._kongtask_pools")
        wait_until(
            lambda: scalar(db, "select count(*) from graphile_worker._kongtask_pools") == 1,
            timeout_s=10,
            what="the pool to register again",
        )
        runner.add_job("t")
        runner.join(10)
    finally:
        assert runner.stop(30)
    assert db.execute(POOLS).fetchall() == []


def test_ordinary_jobs_write_no_crash_bookkeeping(db_url: str, db: psycopg.Connection[Any]) -> None:
    with _runner(db_url, concurrency=4) as runner:
        runner.add_jobs([{"identifier": "t", "payload": {"n": n}} for n in range(50)])
        runner.join(30)
    assert scalar(db, "select count(*) from graphile_worker._kongtask_job_crashes") == 0
    assert scalar(db, "select count(*) from graphile_worker._private_jobs") == 0


def test_a_stale_record_is_released_and_a_fresh_one_is_not(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    # Two pools that "died" holding a job each: one beat 10 minutes ago, one just now.
    stale, fresh = "pool-0000000000000000aa", "pool-0000000000000000bb"
    for pool_id, age in ((stale, "10 minutes"), (fresh, "0")):
        db.execute(
            "insert into graphile_worker._kongtask_pools "
            "(pool_id, hostname, pid, concurrency, version, last_seen) "
            "values (%s, 'h', 1, 1, 'x', now() - %s::interval)",
            (pool_id, age),
        )
        job_id = scalar(
            db, "select id from graphile_worker.add_job('t', run_at => now() + interval '1 day')"
        )
        db.execute(
            "update graphile_worker._private_jobs set locked_by = %s, locked_at = now() "
            "where id = %s",
            (pool_id, job_id),
        )
    with _runner(db_url, heartbeat_interval_s=0.2, pool_dead_after_s=60):
        wait_until(
            lambda: (
                scalar(
                    db,
                    "select count(*) from graphile_worker._private_jobs where locked_by is null",
                )
                == 1
            ),
            timeout_s=10,
            what="the stale pool's job to be released",
        )
        released = db.execute(
            "select last_error from graphile_worker._private_jobs where locked_by is null"
        ).fetchone()
        assert released is not None
        assert released[0].startswith("kongtask: the worker pool holding this job died")
        assert stale in released[0]
        still = "select locked_by from graphile_worker._private_jobs where locked_by is not null"
        assert scalar(db, still) == fresh


def test_a_pool_whose_liveness_lock_is_gone_is_released_at_once(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    # Two pools that beat just now: one still holds its liveness lock (a session of
    # ours stands in for its process), the other's session is gone.
    # A third took its lock before the server last started: that lock went with the
    # server, which says nothing of the pool (it takes the lock again), so only its
    # heartbeat judges it.
    alive, dead, before = "pool-0000000000000000cc", "pool-0000000000000000dd", "pool-00000000ee"
    holder = psycopg.connect(db_url, autocommit=True)
    try:
        holder.execute("select pg_advisory_lock(%s)", (pool_lock_key(alive),))
        jobs = {}
        for pool_id in (alive, dead, before):
            since = (
                "pg_postmaster_start_time() - interval '1 second'" if pool_id == before else "now()"
            )
            db.execute(
                "insert into graphile_worker._kongtask_pools "
                "(pool_id, hostname, pid, concurrency, version, lock_key, lock_since) "
                f"values (%s, 'h', 1, 1, 'x', %s, {since})",
                (pool_id, pool_lock_key(pool_id)),
            )
            jobs[pool_id] = scalar(
                db,
                "select id from graphile_worker.add_job('t', run_at => now() + interval '1 day')",
            )
            db.execute(
                "update graphile_worker._private_jobs set locked_by = %s, locked_at = now() "
                "where id = %s",
                (pool_id, jobs[pool_id]),
            )
        locked_by = "select locked_by from graphile_worker._private_jobs where id = %s"
        # The heartbeat bound (60 s) is far off: only the lock can tell.
        with _runner(
            db_url, heartbeat_interval_s=5, pool_dead_after_s=60, dead_pool_check_interval_s=0.2
        ) as runner:
            own = db.execute(
                "select lock_key from graphile_worker._kongtask_pools where pool_id = %s",
                (runner.pool_id,),
            ).fetchone()
            assert runner.pool_id is not None
            assert own == (pool_lock_key(runner.pool_id),)
            wait_until(
                lambda: scalar(db, locked_by, (jobs[dead],)) is None,
                timeout_s=10,
                what="the pool whose lock is gone to be released",
            )
            assert scalar(db, locked_by, (jobs[alive],)) == alive
            assert scalar(db, locked_by, (jobs[before],)) == before
            # Its process "dies": the session ends and the lock goes with it.
            holder.close()
            wait_until(
                lambda: scalar(db, locked_by, (jobs[alive],)) is None,
                timeout_s=10,
                what="the pool to be released once its lock is gone",
            )
            pools = {
                row[0] for row in db.execute("select pool_id from graphile_worker._kongtask_pools")
            }
            assert pools == {runner.pool_id, before}
            assert scalar(db, locked_by, (jobs[before],)) == before
    finally:
        holder.close()


def test_a_pool_takes_its_lock_again_when_the_lock_session_is_terminated(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    since = "select lock_since from graphile_worker._kongtask_pools"
    holders = (
        "select count(*) from pg_locks l join pg_stat_activity a on a.pid = l.pid "
        "where l.locktype = 'advisory' and l.granted and a.application_name = %s"
    )
    with _runner(
        db_url, heartbeat_interval_s=0.2, pool_dead_after_s=60, dead_pool_check_interval_s=0.2
    ) as runner:
        name = f"{runner.pool_id}-lock"
        assert scalar(db, holders, (name,)) == 1
        first = scalar(db, since)
        killed = scalar(
            db,
            "select count(pg_terminate_backend(pid)) from pg_stat_activity "
            "where application_name = %s",
            (name,),
        )
        assert killed == 1
        wait_until(
            lambda: scalar(db, holders, (name,)) == 1 and scalar(db, since) > first,
            timeout_s=10,
            what="the pool to hold its lock again and say so",
        )
        assert scalar(db, "select count(*) from graphile_worker._kongtask_pools") == 1
