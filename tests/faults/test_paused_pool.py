"""A pool paused past ``pool_dead_after_s`` never runs the jobs it no longer holds.

A real worker process claims six jobs (one running, five waiting in its local
queue) and is stopped with SIGSTOP, as a frozen VM or a debugger would stop
it. A second worker process releases it once its heartbeat is older than the
bound and runs all six. After SIGCONT the paused pool finishes the job that was
running (that one may run twice: its handler was already under way), then finds
that it no longer holds the five it never started and drops them, saying so,
instead of running them a second time.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

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
from .test_sigkill import _locked_by

pytestmark = pytest.mark.faults

HEARTBEAT_S = 0.25
DEAD_AFTER_S = 1.5
HELD = 6
_DROPPED = re.compile(
    r"Dropped (\d+) job\(s\) from the local queue without running them: .* "
    r"\(checked in ([0-9.]+) ms\)"
)


def _runs_in(db: psycopg.Connection[Any], pool_id: str | None) -> int:
    # By pool, not pid: the released jobs are crash suspects, run in child processes.
    return int(
        scalar(db, "select count(*) from ledger where phase = 'ok' and pool_id = %s", (pool_id,))
    )


def test_paused_pool_drops_the_jobs_it_no_longer_holds(
    db_url: str, db: psycopg.Connection[Any], tmp_path: Path, record_property: Any
) -> None:
    install_ledger(db)
    tasks = write_tasks(tmp_path)
    # Job 0 runs first and takes 3 s on its first attempt: it is running when the
    # pool is stopped. The other five wait behind it in the local queue (the paused
    # pool fills its buffer on every claim: a sized one would buffer one round).
    specs = make_specs(1, first_ms=3000, mark_start=True) + make_specs(HELD - 1, start=1)
    specs[0]["priority"] = -1
    enqueue(db, specs)
    common = {
        "poll_interval_s": 0.2,
        "heartbeat_interval_s": HEARTBEAT_S,
        "pool_dead_after_s": DEAD_AFTER_S,
    }
    paused = WorkerProcess.script(
        db_url,
        tasks,
        tmp_path / "paused.log",
        {**common, "concurrency": 1, "local_queue_size": 6, "size_claims": False},
    )
    live: WorkerProcess | None = None
    try:
        pool_id = paused.wait_ready()
        wait_until(
            lambda: (
                _locked_by(db, pool_id) == set(range(HELD))
                and scalar(db, "select count(*) from ledger where phase = 'start'") == 1
            ),
            timeout_s=30,
            what="the pool to hold 6 jobs with job 0 running",
        )
        paused.send(signal.SIGSTOP)
        stopped_at = time.monotonic()
        live = WorkerProcess.script(
            db_url, tasks, tmp_path / "live.log", {**common, "concurrency": 2}
        )
        live.wait_ready()
        wait_until(
            lambda: not _locked_by(db, pool_id),
            timeout_s=30,
            what="the live pool to release the paused one",
        )
        released = time.monotonic() - stopped_at
        wait_until(
            lambda: scalar(db, "select count(*) from graphile_worker._private_jobs") == 0,
            timeout_s=30,
            what="the live pool to run all six jobs",
        )
        assert _runs_in(db, live.pool_id) == HELD
        paused.send(signal.SIGCONT)
        resumed_at = time.monotonic()
        # Before the fix the resumed pool ran the five again, one after the other.
        wait_until(
            lambda: _DROPPED.search(paused.log()) is not None or _runs_in(db, paused.pool_id) >= 2,
            timeout_s=30,
            what="the resumed pool to drop (or run) the jobs it no longer holds",
        )
        settled = time.monotonic() - resumed_at
        for worker in (paused, live):
            worker.send(signal.SIGTERM)
        for worker in (paused, live):
            assert worker.wait(30) == 0, worker.log()
        log = paused.log()
        dropped = _DROPPED.search(log)
        report = check_ledger(db, range(HELD), allowed_repeats={0})
        print(
            f"\npaused pool (SIGSTOP, concurrency 1, heartbeat {HEARTBEAT_S}s, "
            f"pool_dead_after_s={DEAD_AFTER_S}): held 1 running + {HELD - 1} buffered; "
            f"released {released:.2f}s after the stop; "
            f"after SIGCONT: {_runs_in(db, paused.pool_id)} "
            f"run(s) in the paused pool, settled in {settled:.2f}s; {report.summary()}; "
            f"drop line: {dropped.group(0) if dropped else None!r}"
        )
        record_property("ledger", report.summary())
        report.assert_clean()
        assert dropped is not None, log
        assert int(dropped.group(1)) == HELD - 1
        assert "was declared dead by another pool" in log
    finally:
        if paused.proc.poll() is None:
            paused.send(signal.SIGCONT)
        for worker in (paused, live):
            if worker is not None:
                worker.close()
