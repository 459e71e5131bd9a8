"""Scenario 5: SIGTERM while 24 jobs run, half of them longer than the abort timeout.

A ``kongtask -j 24`` process gets SIGTERM with every executor busy. Jobs that
finish within the abort timeout (5 s by default) complete; the others are
failed back with their attempt counted and a message naming the shutdown, no
job or named queue stays locked, and a later run picks them up on attempt 2.
No job is allowed to run twice: the long ones never finished their first try.
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
    scalar,
    wait_until,
    write_tasks,
)

pytestmark = pytest.mark.faults

SHORT = range(12)
LONG = range(12, 24)


def test_sigterm_under_load_fails_back_the_unfinished(
    db_url: str, db: psycopg.Connection[Any], tmp_path: Path, record_property: Any
) -> None:
    install_ledger(db)
    tasks = write_tasks(tmp_path)
    specs: list[dict[str, Any]] = [
        {"identifier": "work", "payload": {"n": n, "mark_start": True, "first_ms": 300 + 100 * n}}
        for n in SHORT
    ]
    for n in LONG:
        spec: dict[str, Any] = {
            "identifier": "work",
            "payload": {"n": n, "mark_start": True, "first_ms": 60_000, "ms": 10},
        }
        if n % 3 == 0:
            spec["queue_name"] = f"long{n}"
        specs.append(spec)
    worker = WorkerProcess.cli(db_url, tasks, tmp_path / "worker.log", jobs=24)
    try:
        worker.wait_ready()
        enqueue(db, specs)
        wait_until(
            lambda: scalar(db, "select count(*) from ledger where phase = 'start'") == 24,
            what="all 24 jobs to be running",
        )
        signalled = time.monotonic()
        worker.send(signal.SIGTERM)
        assert worker.wait(30) == 0, worker.log()
        exited_after = time.monotonic() - signalled
    finally:
        worker.close()
    # The abort timeout is 5 s: the process waits for it, and not much longer.
    assert 4.5 <= exited_after < 15, exited_after

    completed = {row[0] for row in db.execute("select n from completions")}
    assert completed == set(SHORT)
    rows = db.execute(
        "select (payload->>'n')::int, attempts, locked_at, locked_by, last_error, "
        "run_at > now() - interval '1 minute' from graphile_worker._private_jobs order by 1"
    ).fetchall()
    assert [row[0] for row in rows] == list(LONG)
    for _, attempts, locked_at, locked_by, last_error, later in rows:
        assert (attempts, locked_at, locked_by, later) == (1, None, None, True)
        assert "shutting down gracefully" in last_error
    assert (
        scalar(
            db,
            "select count(*) from graphile_worker._private_job_queues where locked_at is not null",
        )
        == 0
    )

    # They are retried later: once their back-off passes, a run picks them up.
    wait_until(
        lambda: (
            scalar(db, "select count(*) from graphile_worker._private_jobs where run_at <= now()")
            == len(LONG)
        ),
        timeout_s=30,
        what="the retry back-off to pass",
    )
    once = subprocess.run(
        [sys.executable, "-m", "kongtask", "-c", to_uri(db_url), "--tasks", str(tasks), "--once"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=WorkerProcess._env(db_url, None),
    )
    assert once.returncode == 0, once.stderr
    retried = dict(db.execute("select n, attempt from ledger where phase = 'ok' and n >= 12"))
    assert retried == dict.fromkeys(LONG, 2)
    report = check_ledger(db, range(24))
    print(
        f"\nscenario 5: SIGTERM with 24 running ({len(SHORT)} short, {len(LONG)} past the 5 s "
        f"abort timeout); exited after {exited_after:.2f}s; {len(completed)} completed, "
        f"{len(rows)} failed back on attempt 1 and completed on attempt 2; {report.summary()}"
    )
    record_property("ledger", report.summary())
    report.assert_clean()
