"""Dead kongtask pools give their jobs back unasked; a job that kills its worker is quarantined.

Workers are real processes. Each keeps a liveness record with a heartbeat
(``heartbeat_interval_s``); a pool whose heartbeat is older than
``pool_dead_after_s`` is released by the live ones: its jobs and named queues
go back to the queue. Locks held by a pool that is not kongtask's (a Node
graphile-worker) are left to the 4-hour sweep.

A handler that calls ``os._exit`` kills its process. After the first death
its batch-mates and itself are suspects; suspects run in child processes of
the next worker, so each further death is a child's, counted against the
poison job alone, and after ``crash_quarantine_after`` (3) counted deaths it
is failed for good. No second worker dies. The innocent jobs of its batch
each run exactly once.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from .ledger import (
    TASKS_SOURCE,
    WorkerProcess,
    check_ledger,
    enqueue,
    install_ledger,
    make_specs,
    scalar,
    wait_until,
    write_tasks,
)
from .test_sigkill import _held_by, _kill_mid_batch

pytestmark = pytest.mark.faults

HEARTBEAT_S = 0.5
DEAD_AFTER_S = 3.0

POISON_SOURCE = '''

def poison(payload, helpers):
    """Kill the whole process, as a segfaulting extension or the OOM killer would."""
    os._exit(77)


tasks["poison"] = poison
'''


def _jobs_other_than(db: psycopg.Connection[Any], job_id: int) -> int:
    return int(
        scalar(db, "select count(*) from graphile_worker._private_jobs where id <> %s", (job_id,))
    )


def test_killed_pool_is_released_automatically(
    db_url: str, db: psycopg.Connection[Any], tmp_path: Path, record_property: Any
) -> None:
    install_ledger(db)
    tasks = write_tasks(tmp_path)
    options = {
        "concurrency": 4,
        "poll_interval_s": 0.2,
        "heartbeat_interval_s": HEARTBEAT_S,
        "pool_dead_after_s": DEAD_AFTER_S,
    }
    workers = [
        WorkerProcess.script(db_url, tasks, tmp_path / f"worker{i}.log", options) for i in range(2)
    ]
    try:
        for worker in workers:
            worker.wait_ready()
        victim, survivor = workers
        # A Node graphile-worker's lock (no liveness record), taken an hour ago.
        foreign_id = scalar(
            db,
            "select id from graphile_worker.add_job('work', '{\"n\": 100000}'::json, "
            "run_at => now() + interval '1 day')",
        )
        db.execute(
            "update graphile_worker._private_jobs set locked_by = 'node-pool-1', "
            "locked_at = now() - interval '1 hour' where id = %s",
            (foreign_id,),
        )
        total = 800
        enqueue(db, make_specs(total, queues=4, queued_every=4, ms=15))
        held = _kill_mid_batch(db, victim)
        killed_at = time.monotonic()
        assert victim.pool_id is not None
        named_stuck = scalar(
            db,
            "select count(*) from graphile_worker._private_job_queues where locked_by = %s",
            (victim.pool_id,),
        )
        wait_until(
            lambda: not _held_by(db, victim.pool_id or ""),
            timeout_s=60,
            what="the dead pool's jobs and queues to be released",
        )
        released = time.monotonic() - killed_at
        wait_until(
            lambda: _jobs_other_than(db, foreign_id) == 0,
            timeout_s=90,
            what="the survivor to run everything",
        )
        recovered = time.monotonic() - killed_at
        # Within the bound plus one check interval (plus slack for a loaded machine);
        # in fact far sooner: the victim's liveness lock went with its process.
        # (A frozen process keeps its lock: test_paused_pool.py covers the bound.)
        assert released <= DEAD_AFTER_S + HEARTBEAT_S + 4.0
        assert (
            scalar(
                db,
                "select count(*) from graphile_worker._kongtask_pools where pool_id = %s",
                (victim.pool_id,),
            )
            == 0
        )
        foreign = db.execute(
            "select locked_by from graphile_worker._private_jobs where id = %s", (foreign_id,)
        ).fetchone()
        assert foreign == ("node-pool-1",), "a Node pool's lock waits for the 4-hour sweep"
        db.execute("delete from graphile_worker._private_jobs where id = %s", (foreign_id,))
        db.execute("delete from public.completions where n = 100000")
        survivor.send(signal.SIGTERM)
        assert survivor.wait(30) == 0, survivor.log()
        assert "Released" in survivor.log()
        report = check_ledger(db, range(total), allowed_repeats=held)
        print(
            f"\ndead pool (SIGKILL, pool_dead_after_s={DEAD_AFTER_S}, heartbeat "
            f"{HEARTBEAT_S}s): {len(held)} jobs held, {named_stuck} named queues locked; "
            f"released {released:.2f}s after the kill, all done {recovered:.2f}s after; "
            f"a Node pool's lock left alone; {report.summary()}"
        )
        record_property("ledger", report.summary())
        report.assert_clean()
    finally:
        for worker in workers:
            worker.close()


def test_job_that_kills_its_worker_is_quarantined(
    db_url: str, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    install_ledger(db)
    tasks = tmp_path / "ledger_tasks.py"
    tasks.write_text(TASKS_SOURCE + POISON_SOURCE)
    innocents = 10
    enqueue(db, make_specs(innocents, ms=50))
    poison_id = scalar(
        db,
        "select id from graphile_worker.add_job('poison', '{}'::json, priority => -1, "
        "max_attempts => 25)",
    )
    base = {"poll_interval_s": 0.2, "heartbeat_interval_s": 0.25, "pool_dead_after_s": 1.0}

    def settled() -> bool:
        return (
            _jobs_other_than(db, poison_id) == 0
            and scalar(
                db,
                "select count(*) from graphile_worker._private_jobs where id = %s "
                "and locked_by is null and attempts >= max_attempts",
                (poison_id,),
            )
            == 1
        )

    exits: list[int] = []
    started = time.monotonic()
    for round_ in range(8):
        # The first worker runs one job at a time, so nothing else of the batch runs
        # alongside the poison's first (not yet suspected) run; later ones run four.
        options = {**base, "concurrency": 1 if round_ == 0 else 4}
        worker = WorkerProcess.script(db_url, tasks, tmp_path / f"round{round_}.log", options)
        try:
            # (No wait for "ready": the worker may die before it is seen to be.)
            wait_until(
                lambda worker=worker: worker.proc.poll() is not None or settled(),
                timeout_s=60,
                what=f"worker {round_} to die or the queue to settle",
            )
            if worker.proc.poll() is None:
                worker.send(signal.SIGTERM)
                assert worker.wait(30) == 0, worker.log()
                break
            exits.append(worker.proc.returncode)
        finally:
            worker.close()
    elapsed = time.monotonic() - started
    assert settled()
    # One worker death before the poison was suspected; the three counted crashes
    # were its child processes' (the second worker lived on).
    assert exits == [77]
    attempts, max_attempts, last_error, locked_by = db.execute(
        "select attempts, max_attempts, last_error, locked_by from graphile_worker._private_jobs "
        "where id = %s",
        (poison_id,),
    ).fetchone() or (None, None, None, None)
    assert locked_by is None and attempts == max_attempts == 25
    assert last_error.startswith("kongtask: quarantined: this job was running when its worker")
    assert "3 times" in last_error
    crashes = scalar(
        db,
        "select crashes from graphile_worker._kongtask_job_crashes where job_id = %s",
        (poison_id,),
    )
    assert crashes == 3
    # The innocent batch-mates: each completed, and run exactly once.
    runs = dict(db.execute("select n, count(*) from ledger where phase = 'ok' group by n"))
    assert runs == dict.fromkeys(range(innocents), 1)
    db.execute("delete from graphile_worker._private_jobs where id = %s", (poison_id,))
    db.execute("delete from public.completions where job_id = %s", (poison_id,))
    report = check_ledger(db, range(innocents))
    print(
        f"\ncrash quarantine: the poison job killed {len(exits)} worker process "
        f"(before it was a suspect), then {crashes} child processes, then was failed for good "
        f"({elapsed:.1f}s in all); last_error: {last_error!r}; innocents: {report.summary()}"
    )
    report.assert_clean()
