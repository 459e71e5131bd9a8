"""Scenario 2: workers killed with SIGKILL mid-batch; their jobs come back and complete.

Several kongtask worker processes (concurrency 4) share a queue that includes
named queues. Killed workers leave jobs (and named queues) locked under their
pool ids. Those come back through ``kongtask admin force-unlock POOL_ID``,
through ``kongtask admin unlock-dead --yes`` (which reads the liveness
records: a killed pool's heartbeat stops) and, in the second test, through the
stale-lock sweep of a survivor whose lock expiry is shortened. (The automatic
release of dead pools is kept out of the way here with a long
``pool_dead_after_s`` and no liveness locks, ``dead_pool_check_interval_s=None``;
``test_dead_pool.py`` and ``test_crash_isolation.py`` test it.)

The only jobs allowed to run twice are the ones the dead pool held at the
moment of the kill: a handler may have finished (and written its ledger row)
without its completion reaching the database.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import to_uri

from .ledger import (
    WorkerProcess,
    check_ledger,
    enqueue,
    install_ledger,
    make_specs,
    scalar,
    wait_until,
    write_tasks,
)

pytestmark = pytest.mark.faults

TOTAL = 1600
QUEUES = 4


def _held_by(db: psycopg.Connection[Any], pool_id: str) -> set[int]:
    """The job numbers ``pool_id`` holds: locked jobs, and jobs stuck behind its queues."""
    rows = db.execute(
        "select (j.payload->>'n')::int from graphile_worker._private_jobs j "
        "left join graphile_worker._private_job_queues q on q.id = j.job_queue_id "
        "where j.locked_by = %(p)s or q.locked_by = %(p)s",
        {"p": pool_id},
    ).fetchall()
    return {row[0] for row in rows}


def _locked_by(db: psycopg.Connection[Any], pool_id: str) -> set[int]:
    rows = db.execute(
        "select (payload->>'n')::int from graphile_worker._private_jobs where locked_by = %s",
        (pool_id,),
    ).fetchall()
    return {row[0] for row in rows}


def _remaining(db: psycopg.Connection[Any]) -> set[int]:
    rows = db.execute("select (payload->>'n')::int from graphile_worker._private_jobs")
    return {row[0] for row in rows}


def _admin(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kongtask", "admin", "-c", to_uri(db_url), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


#: Sessions of a pool (its application_name is the pool id) running a statement now.
_ACTIVE = "select count(*) from pg_stat_activity where application_name = %s and state = 'active'"


def _kill_mid_batch(
    db: psycopg.Connection[Any], worker: WorkerProcess, *, with_queue: bool = True
) -> set[int]:
    """SIGKILL ``worker`` once it has done work and holds jobs and a named queue.

    Returns the job numbers it held (locked, or waiting behind its queue locks).
    """
    pool_id = worker.pool_id
    assert pool_id is not None

    def busy() -> bool:
        done = scalar(db, "select count(*) from ledger where pid = %s", (worker.pid,))
        queues = scalar(
            db,
            "select count(*) from graphile_worker._private_job_queues where locked_by = %s",
            (pool_id,),
        )
        return done >= 40 and (queues > 0 or not with_queue) and len(_locked_by(db, pool_id)) > 0

    # Freeze the worker before checking, so what it holds cannot change between the
    # check and the kill (it could finish its queue's job in that window).
    deadline = time.monotonic() + 60
    while True:
        wait_until(busy, timeout_s=max(1.0, deadline - time.monotonic()),
                   what=f"worker {worker.pid} to be mid-batch")  # fmt: skip
        worker.send(signal.SIGSTOP)
        # A statement sent just before the stop (a complete that frees the queue) may
        # still commit: judge only once none of the pool's sessions is running one.
        wait_until(
            lambda: scalar(db, _ACTIVE, (pool_id,)) == 0,
            timeout_s=10,
            what=f"worker {worker.pid}'s statements in flight to end",
        )
        if busy():
            break
        worker.send(signal.SIGCONT)
    worker.send(signal.SIGKILL)
    worker.wait(10)
    held = _held_by(db, pool_id)
    assert _locked_by(db, pool_id), "the kill should leave jobs locked by the dead pool"
    return held


def _remaining_outside(db: psycopg.Connection[Any], dead: list[str]) -> int:
    return scalar(
        db,
        "select count(*) from graphile_worker._private_jobs j "
        "left join graphile_worker._private_job_queues q on q.id = j.job_queue_id "
        "where not (coalesce(j.locked_by, '') = any(%(d)s)) "
        "and not (coalesce(q.locked_by, '') = any(%(d)s))",
        {"d": dead},
    )


def test_sigkilled_workers_recovered_by_admin_commands(
    db_url: str, db: psycopg.Connection[Any], tmp_path: Path, record_property: Any
) -> None:
    install_ledger(db)
    tasks = write_tasks(tmp_path)
    # Quick heartbeats, so that `unlock-dead --dead-after 2` can tell live from dead.
    options = {
        "concurrency": 4,
        "poll_interval_s": 0.2,
        "heartbeat_interval_s": 0.25,
        "pool_dead_after_s": 600,
        "dead_pool_check_interval_s": None,
    }
    workers = [
        WorkerProcess.script(db_url, tasks, tmp_path / f"worker{i}.log", options) for i in range(4)
    ]
    try:
        for worker in workers:
            worker.wait_ready()
        a, b, c, d = workers
        enqueue(db, make_specs(TOTAL, queues=QUEUES, queued_every=5, ms=15))

        # Two workers die mid-batch, one right after the other.
        held_a = _kill_mid_batch(db, a)
        # The first may have taken every named queue with it: B need not hold one.
        held_b = _kill_mid_batch(db, b, with_queue=False)
        assert a.pool_id is not None and b.pool_id is not None
        dead = [a.pool_id, b.pool_id]
        # The survivors carry on with everything the dead did not hold.
        wait_until(
            lambda: _remaining_outside(db, dead) == 0,
            timeout_s=90,
            what="the survivors to drain the rest",
        )
        assert c.proc.poll() is None and d.proc.poll() is None
        stuck = scalar(db, "select count(*) from graphile_worker._private_jobs")
        assert stuck == len(_held_by(db, a.pool_id) | _held_by(db, b.pool_id)) > 0
        named_stuck = scalar(
            db,
            "select count(*) from graphile_worker._private_job_queues where locked_by = any(%s)",
            (dead,),
        )

        # Their heartbeats stopped with them.
        wait_until(
            lambda: (
                scalar(
                    db,
                    "select count(*) from graphile_worker._kongtask_pools where pool_id = any(%s) "
                    "and last_seen < now() - interval '2 seconds'",
                    (dead,),
                )
                == 2
            ),
            timeout_s=30,
            what="the dead pools' heartbeats to age past 2 s",
        )
        # unlock-dead without --yes lists exactly the two dead pools and changes nothing.
        listing = _admin(db_url, "unlock-dead", "--dead-after", "2")
        assert listing.returncode == 0, listing.stderr
        listed = {line.split(":")[0] for line in listing.stdout.splitlines() if ": " in line}
        assert listed == set(dead), listing.stdout
        assert "Node graphile-worker" in listing.stderr
        assert scalar(db, "select count(*) from graphile_worker._private_jobs") == stuck

        # Operator path 1: force-unlock the first dead pool by id.
        started = time.monotonic()
        result = _admin(db_url, "force-unlock", a.pool_id)
        assert result.returncode == 0, result.stderr
        wait_until(
            lambda: _remaining(db) <= _held_by(db, b.pool_id),
            timeout_s=60,
            what="the force-unlocked jobs to complete",
        )
        recovered_a = time.monotonic() - started
        assert not _locked_by(db, a.pool_id)

        # Operator path 2: unlock-dead --yes finds the second one by itself.
        started = time.monotonic()
        result = _admin(db_url, "unlock-dead", "--dead-after", "2", "--yes")
        assert result.returncode == 0, result.stderr
        assert b.pool_id in result.stdout and a.pool_id not in result.stdout
        wait_until(
            lambda: scalar(db, "select count(*) from graphile_worker._private_jobs") == 0,
            timeout_s=60,
            what="every job to complete",
        )
        recovered_b = time.monotonic() - started
        again = _admin(db_url, "unlock-dead", "--dead-after", "2")
        assert again.stdout.strip() == "No dead pools hold locks"

        for worker in (c, d):
            worker.send(signal.SIGTERM)
            assert worker.wait(30) == 0, worker.log()
        report = check_ledger(db, range(TOTAL), allowed_repeats=held_a | held_b)
        print(
            f"\nscenario 2 (admin): killed 2 of 4 workers holding {len(held_a)}+{len(held_b)} "
            f"jobs ({named_stuck} named queues locked); force-unlock recovered in "
            f"{recovered_a:.2f}s, unlock-dead in {recovered_b:.2f}s; {report.summary()}"
        )
        record_property("ledger", report.summary())
        report.assert_clean()
        assert named_stuck >= 1
    finally:
        for worker in workers:
            worker.close()


def test_sigkilled_worker_recovered_by_stale_lock_sweep(
    db_url: str, db: psycopg.Connection[Any], tmp_path: Path, record_property: Any
) -> None:
    install_ledger(db)
    tasks = write_tasks(tmp_path)
    options = {
        "concurrency": 4,
        "poll_interval_s": 0.2,
        "lock_expiry": "3 seconds",
        "min_reset_locked_interval_s": 0.5,
        "max_reset_locked_interval_s": 1.0,
        "dead_pool_check_interval_s": None,
    }
    workers = [
        WorkerProcess.script(db_url, tasks, tmp_path / f"sweeper{i}.log", options) for i in range(2)
    ]
    try:
        for worker in workers:
            worker.wait_ready()
        victim, survivor = workers
        total = TOTAL // 2
        enqueue(db, make_specs(total, queues=QUEUES, queued_every=4, ms=15))
        held = _kill_mid_batch(db, victim)
        killed_at = time.monotonic()
        assert victim.pool_id is not None
        named_stuck = scalar(
            db,
            "select count(*) from graphile_worker._private_job_queues where locked_by = %s",
            (victim.pool_id,),
        )
        wait_until(
            lambda: scalar(db, "select count(*) from graphile_worker._private_jobs") == 0,
            timeout_s=90,
            what="the sweep to free the dead worker's jobs and the survivor to run them",
        )
        recovered = time.monotonic() - killed_at
        # Not before the expiry: the sweep only takes locks older than 3 seconds.
        assert recovered >= 2.0
        survivor.send(signal.SIGTERM)
        assert survivor.wait(30) == 0, survivor.log()
        report = check_ledger(db, range(total), allowed_repeats=held)
        print(
            f"\nscenario 2 (sweep): killed 1 of 2 workers holding {len(held)} jobs "
            f"({named_stuck} named queues locked); the stale-lock sweep (expiry 3 s) "
            f"recovered all in {recovered:.2f}s; {report.summary()}"
        )
        record_property("ledger", report.summary())
        report.assert_clean()
    finally:
        for worker in workers:
            worker.close()
