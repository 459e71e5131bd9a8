"""Crash isolation: a handler that kills its process costs a child process, never a worker.

Real child processes and a real segfault (``ctypes.string_at(0)``):

- a task declared ``isolate=True`` segfaults in its child: the worker (this
  test's own process) lives on, the job fails with a message naming SIGSEGV,
  the crash is counted, and the other jobs run;
- a whole worker process is SIGKILLed mid-batch: a surviving worker finds its
  liveness lock gone and runs the jobs it held within seconds, long before
  the heartbeat bound (60 s here);
- a poison job segfaults its worker once; from then on it is a crash suspect
  and runs in a child, its crashes are counted there and it is quarantined,
  and no second worker dies.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from kongtask.jobs.task_loader import load_tasks
from kongtask.runner import Runner

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
from .test_sigkill import _held_by, _kill_mid_batch, _locked_by

pytestmark = pytest.mark.faults

ISOLATED_TASKS = '''\
"""Tasks for the crash isolation scenarios."""

import ctypes
import os

import kongtask


@kongtask.task(isolate=True)
def segfault(payload, helpers):
    """Dereference address 0: SIGSEGV, as a broken C extension would."""
    ctypes.string_at(0)


@kongtask.task(isolate=True)
def isolated_note(payload, helpers):
    """Record the pid of the process that ran the handler, over the child's own connection."""
    with helpers.with_connection() as conn:
        conn.execute(
            "insert into public.ran (n, pid, job_id) values (%s, %s, %s)",
            (payload["n"], os.getpid(), helpers.job.id),
        )


@kongtask.task(executor="process")
def pooled_note(payload, helpers):
    """Runs on the process pool."""
    note(payload, helpers)


@kongtask.task(executor="process")
def pooled_segfault(payload, helpers):
    ctypes.string_at(0)


def note(payload, helpers):
    with helpers.with_connection() as conn:
        conn.execute(
            "insert into public.ran (n, pid, job_id) values (%s, %s, %s)",
            (payload["n"], os.getpid(), helpers.job.id),
        )


tasks = {
    "segfault": segfault,
    "isolated_note": isolated_note,
    "note": note,
    "pooled_note": pooled_note,
    "pooled_segfault": pooled_segfault,
}
'''

SEGFAULT_SOURCE = '''

import ctypes


def poison(payload, helpers):
    """Segfault the process running it."""
    ctypes.string_at(0)


tasks["poison"] = poison
'''


def _add(db: psycopg.Connection[Any], task: str, payload: str, max_attempts: int = 25) -> int:
    return int(
        scalar(
            db,
            "select id from graphile_worker.add_job(%s, %s::json, max_attempts => %s)",
            (task, payload, max_attempts),
        )
    )


def test_isolated_segfault_fails_only_its_job(
    db_url: str, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    db.execute("create table public.ran (n int, pid int, job_id bigint)")
    path = tmp_path / "isolated_tasks.py"
    path.write_text(ISOLATED_TASKS)
    tasks = load_tasks(str(path))
    runner = Runner(
        tasks=tasks, connection_string=db_url, concurrency=2, install_signal_handlers=False
    ).start()
    try:
        crash_id = _add(db, "segfault", "{}", max_attempts=1)
        for n in range(3):
            _add(db, "isolated_note", f'{{"n": {n}}}')
        for n in range(3, 8):
            _add(db, "note", f'{{"n": {n}}}')
        wait_until(
            lambda: scalar(db, "select count(*) from graphile_worker._private_jobs where id <> %s",
                           (crash_id,)) == 0,
            timeout_s=60,
            what="the other jobs to complete",
        )  # fmt: skip
        wait_until(
            lambda: (
                scalar(
                    db,
                    "select count(*) from graphile_worker._private_jobs where id = %s "
                    "and locked_by is null and attempts = 1",
                    (crash_id,),
                )
                == 1
            ),
            timeout_s=60,
            what="the segfaulting job's attempt to fail",
        )
        last_error = scalar(
            db, "select last_error from graphile_worker._private_jobs where id = %s", (crash_id,)
        )
        assert last_error.startswith("kongtask: the process running this job died")
        assert "killed by SIGSEGV" in last_error
        crashes = scalar(
            db,
            "select crashes from graphile_worker._kongtask_job_crashes where job_id = %s",
            (crash_id,),
        )
        assert crashes == 1
        pids = dict(db.execute("select n, pid from public.ran").fetchall())
        assert sorted(pids) == list(range(8))
        # Isolated jobs ran in children (each its own), the plain ones in this process.
        assert all(pids[n] != os.getpid() for n in range(3))
        assert len({pids[n] for n in range(3)}) == 3
        assert all(pids[n] == os.getpid() for n in range(3, 8))
        # The worker is alive and still takes jobs.
        _add(db, "note", '{"n": 100}')
        wait_until(
            lambda: scalar(db, "select count(*) from public.ran where n = 100") == 1,
            timeout_s=30,
            what="a job after the crash",
        )
        print(f"\nisolate=True segfault: the worker lived on; last_error: {last_error!r}")
    finally:
        assert runner.stop(30)


def test_a_broken_process_pool_is_replaced_and_the_crash_pinned_on_its_job(
    db_url: str, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    db.execute("create table public.ran (n int, pid int, job_id bigint)")
    path = tmp_path / "isolated_tasks.py"
    path.write_text(ISOLATED_TASKS)
    runner = Runner(
        tasks=load_tasks(str(path)),
        connection_string=db_url,
        concurrency=2,
        install_signal_handlers=False,
    ).start()
    ran = "select pid from public.ran where n = %s"
    try:
        _add(db, "pooled_note", '{"n": 0}')
        wait_until(lambda: db.execute(ran, (0,)).fetchone() is not None, timeout_s=60,
                   what="a job on the process pool")  # fmt: skip
        first_pid = scalar(db, ran, (0,))
        assert first_pid != os.getpid()
        crash_id = _add(db, "pooled_segfault", "{}", max_attempts=2)
        # First attempt: the pool breaks (nobody blamed); the second runs alone in a
        # child as a suspect, where the crash is counted against this job.
        wait_until(
            lambda: (
                scalar(
                    db,
                    "select count(*) from graphile_worker._private_jobs where id = %s "
                    "and locked_by is null and attempts = 2",
                    (crash_id,),
                )
                == 1
            ),
            timeout_s=60,
            what="both attempts of the segfaulting pool job to fail",
        )
        last_error = scalar(
            db, "select last_error from graphile_worker._private_jobs where id = %s", (crash_id,)
        )
        assert "killed by SIGSEGV" in last_error
        crashes = scalar(
            db,
            "select crashes from graphile_worker._kongtask_job_crashes where job_id = %s",
            (crash_id,),
        )
        assert crashes == 1
        # A fresh pool runs the next job.
        _add(db, "pooled_note", '{"n": 1}')
        wait_until(lambda: db.execute(ran, (1,)).fetchone() is not None, timeout_s=60,
                   what="a job on the replaced process pool")  # fmt: skip
        assert scalar(db, ran, (1,)) not in (first_pid, os.getpid())
    finally:
        assert runner.stop(30)


def test_sigkilled_worker_jobs_run_on_survivor_within_seconds(
    db_url: str, db: psycopg.Connection[Any], tmp_path: Path, record_property: Any
) -> None:
    install_ledger(db)
    tasks = write_tasks(tmp_path)
    # The heartbeat bound (60 s) is far away: only the liveness lock can release the pool.
    options = {
        "concurrency": 4,
        "poll_interval_s": 0.2,
        "heartbeat_interval_s": 5.0,
        "pool_dead_after_s": 60.0,
        "dead_pool_check_interval_s": 1.0,
    }
    workers = [
        WorkerProcess.script(db_url, tasks, tmp_path / f"worker{i}.log", options) for i in range(2)
    ]
    try:
        for worker in workers:
            worker.wait_ready()
        victim, survivor = workers
        total = 400
        enqueue(db, make_specs(total, queues=4, queued_every=4, ms=15))
        held = _kill_mid_batch(db, victim)
        killed_at = time.monotonic()
        assert victim.pool_id is not None
        locked = _locked_by(db, victim.pool_id)
        wait_until(
            lambda: not _held_by(db, victim.pool_id or ""),
            timeout_s=30,
            what="the dead pool's jobs and queues to be released",
        )
        released = time.monotonic() - killed_at
        # The jobs it had locked (the crash suspects) each ran to success on the survivor.
        # (Suspects run in child processes of the survivor: any pid but the victim's.)
        done = (
            "select count(distinct n) from ledger where phase = 'ok' and n = any(%s) and pid <> %s"
        )

        try:
            wait_until(
                lambda: scalar(db, done, (list(locked), victim.pid)) == len(locked),
                timeout_s=30,
                what="the dead pool's jobs to run on the survivor",
            )
        except AssertionError as exc:
            rows = db.execute(
                "select n, pid, phase, pool_id from ledger where n = any(%s) order by n",
                (list(locked),),
            ).fetchall()
            raise AssertionError(f"{exc}; victim pid {victim.pid}, ledger: {rows}") from None
        ran = time.monotonic() - killed_at
        wait_until(
            lambda: scalar(db, "select count(*) from graphile_worker._private_jobs") == 0,
            timeout_s=90,
            what="the survivor to run everything",
        )
        survivor.send(signal.SIGTERM)
        assert survivor.wait(30) == 0, survivor.log()
        report = check_ledger(db, range(total), allowed_repeats=held)
        print(
            f"\nSIGKILL (concurrency 4, heartbeat 5 s, pool_dead_after_s 60, "
            f"dead_pool_check_interval_s 1): {len(locked)} jobs locked and {len(held)} held "
            f"by the dead pool; released {released:.2f}s after the kill, its locked jobs all "
            f"done on the survivor {ran:.2f}s after; {report.summary()}"
        )
        record_property("innocents_ran_s", round(ran, 2))
        assert ran < 10.0, f"the dead pool's jobs took {ran:.2f}s to run"
        report.assert_clean()
    finally:
        for worker in workers:
            worker.close()


def test_poison_job_is_quarantined_without_killing_a_second_worker(
    db_url: str, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    install_ledger(db)
    tasks = tmp_path / "ledger_tasks.py"
    tasks.write_text(TASKS_SOURCE + SEGFAULT_SOURCE)
    innocents = 10
    enqueue(db, make_specs(innocents, ms=50))
    poison_id = scalar(
        db,
        "select id from graphile_worker.add_job('poison', '{}'::json, priority => -1, "
        "max_attempts => 25)",
    )
    base = {
        "poll_interval_s": 0.2,
        "heartbeat_interval_s": 5.0,
        "pool_dead_after_s": 60.0,
        "dead_pool_check_interval_s": 0.5,
        "crash_quarantine_after": 2,
    }

    def settled() -> bool:
        return bool(
            scalar(db, "select count(*) from graphile_worker._private_jobs where id <> %s",
                   (poison_id,)) == 0
            and scalar(
                db,
                "select count(*) from graphile_worker._private_jobs where id = %s "
                "and locked_by is null and attempts >= max_attempts",
                (poison_id,),
            )
            == 1
        )  # fmt: skip

    started = time.monotonic()
    # The first worker runs one job at a time: the poison (priority first) runs in
    # its process, not yet suspected, and kills it.
    first = WorkerProcess.script(db_url, tasks, tmp_path / "first.log", {**base, "concurrency": 1})
    try:
        wait_until(lambda: first.proc.poll() is not None, timeout_s=60, what="the first to die")
    finally:
        first.close()
    assert first.proc.returncode == -signal.SIGSEGV, first.log()
    second = WorkerProcess.script(
        db_url, tasks, tmp_path / "second.log", {**base, "concurrency": 4}
    )
    try:
        wait_until(
            lambda: second.proc.poll() is not None or settled(),
            timeout_s=90,
            what="the queue to settle (or the second worker to die)",
        )
        assert second.proc.poll() is None, "the poison job killed a second worker"
        elapsed = time.monotonic() - started
        second.send(signal.SIGTERM)
        assert second.wait(30) == 0, second.log()
    finally:
        second.close()
    attempts, max_attempts, last_error = db.execute(
        "select attempts, max_attempts, last_error from graphile_worker._private_jobs "
        "where id = %s",
        (poison_id,),
    ).fetchone() or (None, None, None)
    assert attempts == max_attempts == 25
    assert isinstance(last_error, str)
    assert last_error.startswith("kongtask: quarantined: this job was running when its worker")
    assert "2 times" in last_error
    crashes = scalar(
        db,
        "select crashes from graphile_worker._kongtask_job_crashes where job_id = %s",
        (poison_id,),
    )
    assert crashes == 2
    assert "killed by SIGSEGV" in second.log()
    runs = dict(db.execute("select n, count(*) from ledger where phase = 'ok' group by n"))
    assert runs == dict.fromkeys(range(innocents), 1)
    db.execute("delete from graphile_worker._private_jobs where id = %s", (poison_id,))
    db.execute("delete from public.completions where job_id = %s", (poison_id,))
    report = check_ledger(db, range(innocents))
    print(
        f"\npoison segfault: 1 worker process died (before the job was suspected), then "
        f"{crashes} crashes counted in child processes and the job quarantined, no second "
        f"worker died ({elapsed:.1f}s in all); innocents: {report.summary()}"
    )
    report.assert_clean()
