"""A pool never runs a buffered job it no longer holds, and never completes another pool's.

Two Runners in one process share a database. The first claims jobs and is
kept busy by a handler waiting on a gate; its locks are then taken away from
under it (``force_unlock_workers``, as an operator or a dead-pool release
would) and the second Runner runs the jobs. What the first does once its
handler returns is the subject.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import psycopg

from kongtask.runner import Runner
from tests.faults.ledger import scalar

from .worker_support import EventLog, add_jobs_sql, recording, wait_until

HEARTBEAT_S = 0.25
DEAD_AFTER_S = 3.0
#: When the pools above doubt a buffered job: halfway between heartbeat and bound (a
#: heartbeat late by that much, on a loaded machine, is unlikely to be the reason).
DOUBT_AFTER_S = (HEARTBEAT_S + DEAD_AFTER_S) / 2


class Gated:
    """A task handler that records every run, and holds first attempts until the gate opens."""

    def __init__(self, hold: Callable[[Any], bool]) -> None:
        self.gate = threading.Event()
        self._hold = hold
        self._lock = threading.Lock()
        self.runs: list[tuple[str, int]] = []

    def __call__(self, payload: Any, helpers: Any) -> None:
        job = helpers.job
        with self._lock:
            self.runs.append((job.locked_by, payload["n"]))
        if self._hold(job):
            assert self.gate.wait(30), "the test never opened the gate"

    def counts(self) -> Counter[int]:
        with self._lock:
            return Counter(n for _, n in self.runs)


def _runner(db_url: str, handler: Gated, **options: Any) -> Runner:
    return Runner(
        tasks={"t": handler},
        connection_string=db_url,
        install_signal_handlers=False,
        poll_interval_s=0.2,
        heartbeat_interval_s=HEARTBEAT_S,
        pool_dead_after_s=DEAD_AFTER_S,
        **options,
    )


def _locked_by(db: psycopg.Connection[Any], pool_id: str) -> int:
    return int(
        scalar(
            db,
            "select count(*) from graphile_worker._private_jobs where locked_by = %s",
            (pool_id,),
        )
    )


def _force_unlock(db: psycopg.Connection[Any], pool_id: str) -> None:
    db.execute("select graphile_worker.force_unlock_workers(array[%s])", (pool_id,))


def _job_started(log: EventLog, n: int) -> bool:
    return any(payload["job"].payload["n"] == n for payload in log.payloads("job:start"))


def test_buffered_jobs_taken_from_the_pool_are_dropped_not_run(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    # Job 0 holds the only executor of the first pool; jobs 1-5 wait in its buffer.
    handler = Gated(lambda job: job.payload["n"] == 0 and job.attempts == 1)
    add_jobs_sql(
        db,
        [{"identifier": "t", "payload": {"n": 0}, "priority": -1}]
        + [{"identifier": "t", "payload": {"n": n}} for n in range(1, 6)],
    )
    # Every claim fills the buffer (a sized pool buffers one round of jobs behind a
    # busy slot): the test needs five jobs waiting behind job 0.
    first = _runner(db_url, handler, concurrency=1, local_queue_size=6, size_claims=False)
    second = _runner(db_url, handler, concurrency=2)
    try:
        with recording(first) as log:
            first.start()
            pool_id = first.pool_id
            assert pool_id is not None
            wait_until(lambda: _job_started(log, 0), what="job 0 to start in the first pool")
            started_at = time.monotonic()
            wait_until(lambda: _locked_by(db, pool_id) == 6, what="the first pool to hold 6")
            # The first pool beats all along: only the jobs' age can make it doubt them.
            _force_unlock(db, pool_id)
            second.start()
            wait_until(
                lambda: scalar(db, "select count(*) from graphile_worker._private_jobs") == 0,
                what="the second pool to run all six",
            )
            wait_until(
                lambda: time.monotonic() - started_at > DOUBT_AFTER_S,
                what="the buffered jobs to be older than the bound",
            )
            handler.gate.set()
            first.join(10)
            # Job 0 was running when its lock went: it ran in both pools. The rest
            # ran once, in the second (before: twice, the first pool ran its buffer).
            assert handler.counts() == {0: 2, 1: 1, 2: 1, 3: 1, 4: 1, 5: 1}
            log.wait_for("localQueue:dropJobs")
            dropped = log.payloads("localQueue:dropJobs")
            started = [payload["job"].payload["n"] for payload in log.payloads("job:start")]
    finally:
        handler.gate.set()
        assert first.stop(30)
        assert second.stop(30)
    assert started == [0]
    assert len(dropped) == 1
    assert sorted(job.payload["n"] for job in dropped[0]["jobs"]) == [1, 2, 3, 4, 5]
    assert dropped[0]["pool_id"] == pool_id
    assert "claimed (or last confirmed)" in dropped[0]["reason"]


def test_a_finished_handler_does_not_complete_a_job_another_pool_now_holds(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    # The job runs in the first pool, loses its lock, and runs again in the second;
    # both handlers wait until the test lets them finish, the first one first.
    handler = Gated(lambda job: True)
    second_gate = threading.Event()
    add_jobs_sql(db, [{"identifier": "t", "payload": {"n": 0}, "queue_name": "serial"}])
    # The flag set with the unlock keeps the first pool from claiming the job back.
    first = _runner(db_url, handler, concurrency=1, forbidden_flags=["moved"])

    def in_second(payload: Any, helpers: Any) -> None:
        assert second_gate.wait(30)

    second = Runner(
        tasks={"t": in_second},
        connection_string=db_url,
        install_signal_handlers=False,
        poll_interval_s=0.2,
    )
    try:
        with recording(first) as first_log, recording(second) as second_log:
            first.start()
            first_log.wait_for("job:start")
            first_pool = first.pool_id
            assert first_pool is not None
            with db.transaction():
                _force_unlock(db, first_pool)
                db.execute("update graphile_worker._private_jobs set flags = '{\"moved\": true}'")
            second.start()
            second_log.wait_for("job:start")
            second_pool = second.pool_id
            held = "select locked_by from graphile_worker._private_jobs"
            assert scalar(db, held) == second_pool
            handler.gate.set()
            first_log.wait_for("job:complete")
            first.join(10)  # its outcome is written
            # The second pool's run is not cut short by the first pool's success.
            assert scalar(db, held) == second_pool
            second_gate.set()
            second_log.wait_for("job:complete")
            second.join(10)
    finally:
        handler.gate.set()
        second_gate.set()
        assert first.stop(30)
        assert second.stop(30)
    assert scalar(db, "select count(*) from graphile_worker._private_jobs") == 0
    # Before, the first pool deleted the row: the second one's completion found
    # nothing and left its named queue locked.
    queue_lock = "select locked_by from graphile_worker._private_job_queues"
    assert scalar(db, queue_lock) is None


def test_a_job_the_pool_claimed_again_runs_once_from_the_later_claim(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    # Room for 10 and only 6 jobs: a short claim, so the pool keeps claiming.
    handler = Gated(lambda job: job.payload["n"] == 0 and job.attempts == 1)
    add_jobs_sql(
        db,
        [{"identifier": "t", "payload": {"n": 0}, "priority": -1}]
        + [{"identifier": "t", "payload": {"n": n}} for n in range(1, 6)],
    )
    runner = _runner(db_url, handler, concurrency=1, local_queue_size=10, size_claims=False)
    try:
        with recording(runner) as log:
            runner.start()
            pool_id = runner.pool_id
            assert pool_id is not None
            wait_until(lambda: _job_started(log, 0), what="job 0 to start")
            started_at = time.monotonic()
            wait_until(lambda: _locked_by(db, pool_id) == 6, what="the pool to hold 6")
            _force_unlock(db, pool_id)
            # The next poll claims them again: jobs 1-4 are now buffered twice, under
            # the old lock and the new one (the buffer has room for 5 more).
            wait_until(lambda: _locked_by(db, pool_id) == 5, what="the pool to claim again")
            wait_until(
                lambda: time.monotonic() - started_at > DOUBT_AFTER_S,
                what="the first copies to be older than the bound",
            )
            handler.gate.set()
            runner.join(10)
            counts = handler.counts()
            # Before: the copies of the first claim ran too.
            assert {n: counts[n] for n in range(1, 6)} == {1: 1, 2: 1, 3: 1, 4: 1, 5: 1}
            # Job 0 ran from the first claim. Its copy from the later claim runs too,
            # unless the executor reaches it only once it is older than the bound as well
            # (a slow machine): by then the first run's success has deleted the row, so
            # the copy is dropped with the first claim's.
            assert counts[0] in (1, 2), counts
            log.wait_for("localQueue:dropJobs")
            dropped = log.payloads("localQueue:dropJobs")
    finally:
        handler.gate.set()
        assert runner.stop(30)
    assert len(dropped) == 1
    jobs = dropped[0]["jobs"]
    assert sorted(job.payload["n"] for job in jobs if job.attempts == 1) == [1, 2, 3, 4, 5]
    later = [job.payload["n"] for job in jobs if job.attempts > 1]
    assert later == ([] if counts[0] == 2 else [0])
