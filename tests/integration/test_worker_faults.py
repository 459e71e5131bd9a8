"""The worker survives its database connections being killed under it."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest

from kongtask.runner import Runner

from .worker_support import add_jobs_sql, jobs, locked_queues, recording

pytestmark = pytest.mark.faults

TOTAL = 3000


def _terminate_others(db: psycopg.Connection[Any]) -> int:
    rows = db.execute(
        "select pg_terminate_backend(pid) from pg_stat_activity "
        "where datname = current_database() and pid <> pg_backend_pid()"
    ).fetchall()
    return len(rows)


def test_lost_connections_mid_batch_lose_nothing(db_url: str, db: psycopg.Connection[Any]) -> None:
    lock = threading.Lock()
    done: set[int] = set()
    halfway = threading.Event()

    def task(payload: Any, helpers: Any) -> None:
        with lock:
            done.add(payload["n"])
            if len(done) >= TOTAL // 3:
                halfway.set()

    specs = [{"identifier": "t", "payload": {"n": n}} for n in range(TOTAL)]
    specs += [
        {"identifier": "t", "payload": {"n": TOTAL + n}, "queue_name": f"q{n % 4}"}
        for n in range(40)
    ]
    runner = Runner(
        tasks={"t": task},
        connection_string=db_url,
        concurrency=4,
        local_queue_size=50,
        poll_interval_s=0.5,
        install_signal_handlers=False,
    )
    with recording(runner) as log, runner:
        log.wait_for("pool:listen:success")
        runner.join(10)
        add_jobs_sql(db, specs)
        assert halfway.wait(30)
        assert _terminate_others(db) >= 3  # claimer, completer, listener at least
        log.wait_for("pool:listen:error")
        log.wait_for("pool:listen:success", count=2)
        runner.join(60)
    queues = db.execute(
        "select queue_name, locked_by from graphile_worker._private_job_queues"
    ).fetchall()
    assert done == set(range(TOTAL + 40)), (queues, runner.pool_id, len(jobs(db)))
    assert jobs(db) == []
    assert locked_queues(db) == 0
