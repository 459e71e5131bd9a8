"""Scenario 3: the worker's database sessions are terminated again and again under load.

Every session of a Runner announces its pool id as ``application_name``, so
``pg_terminate_backend`` can hit exactly the worker (pool and LISTEN
connection) and spare the ledger, which writes over connections of its own.
After each round the worker must reconnect with back-off and carry on; at the
end LISTEN must be back (a job added with a 60 s poll interval is picked up in
well under a second, and a ``jobs:insert`` notification is seen), no job lost
or run twice, and every actor still alive: the Runner keeps working rather
than stopping, and it then stops cleanly without a fatal error.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from kongtask.jobs.task_loader import load_tasks
from kongtask.runner import Runner
from tests.conftest import to_uri
from tests.integration.worker_support import recording

from .ledger import (
    check_ledger,
    enqueue,
    install_ledger,
    make_specs,
    scalar,
    wait_until,
    write_tasks,
)

pytestmark = pytest.mark.faults

TOTAL = 5000
ROUNDS = 10


def _terminate(db: psycopg.Connection[Any], pool_id: str) -> int:
    rows = db.execute(
        "select pg_terminate_backend(pid) from pg_stat_activity where application_name = %s",
        (pool_id,),
    ).fetchall()
    return sum(1 for (ok,) in rows if ok)


def _ok_count(db: psycopg.Connection[Any]) -> int:
    return scalar(db, "select count(*) from ledger where phase = 'ok'")


def test_terminated_backends_under_load(
    db_url: str,
    db: psycopg.Connection[Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    record_property: Any,
) -> None:
    install_ledger(db)
    monkeypatch.setenv("KONGTASK_LEDGER_URL", to_uri(db_url))
    monkeypatch.delenv("KONGTASK_LEDGER_VIA", raising=False)
    tasks = load_tasks(str(write_tasks(tmp_path)))
    runner = Runner(
        tasks=tasks,
        connection_string=db_url,
        concurrency=8,
        poll_interval_s=60.0,
        install_signal_handlers=False,
    )
    killed = 0
    under_load: list[int] = []
    with recording(runner) as log:
        runner.start()
        try:
            pool_id = runner.pool_id
            assert pool_id is not None
            log.wait_for("pool:listen:success")
            enqueue(db, make_specs(TOTAL, queues=4, queued_every=10, ms=1))
            last = 0
            for _ in range(ROUNDS):
                mark = last
                # Some progress between kills, and always with work left to do.
                target = min(mark + TOTAL // (ROUNDS * 2), TOTAL - 500)
                wait_until(
                    lambda target=target: _ok_count(db) >= target,
                    timeout_s=60,
                    what="progress between kills",
                )
                last = _ok_count(db)
                killed += _terminate(db, pool_id)
                under_load.append(TOTAL - last)
            kills_done = time.monotonic()
            wait_until(
                lambda: scalar(db, "select count(*) from graphile_worker._private_jobs") == 0,
                timeout_s=120,
                what="every job to complete after the kills",
            )
            drained_after = time.monotonic() - kills_done
            # Well under the 60 s poll interval: a released named queue wakes the
            # claimer at once (this once idled until the poll, a lost wake-up).
            assert drained_after < 15.0, drained_after
            assert runner.running

            # LISTEN is back: with a 60 s poll interval only a notification explains
            # a job being picked up within seconds.
            successes = log.count("pool:listen:success")
            assert successes >= 2
            wait_until(
                lambda: runner.listening is True,
                what="the LISTEN connection to be back",
            )
            runner.join(30)
            notified = log.count("pool:listen:notification")
            added = time.monotonic()
            enqueue(db, make_specs(1, start=TOTAL))
            pickup = wait_until(
                lambda: scalar(db, "select count(*) from completions where n = %s", (TOTAL,)) == 1,
                timeout_s=10,
                what="the job added after the kills to run via NOTIFY",
            )
            assert log.count("pool:listen:notification") > notified
            assert time.monotonic() - added < 10

            # No actor died silently: every one is alive and the Runner still works.
            probe = runner.probe()
            for name in ("claimer", "completer", "sweeper", "executors"):
                assert probe[name]["ok"], (name, probe[name])
            assert log.count("pool:fatalError") == 0
        finally:
            stopped = runner.stop(60)
            tasks["work"].__globals__["close_connections"]()
    assert stopped  # and stop() raised no fatal error
    report = check_ledger(db, range(TOTAL + 1))
    print(
        f"\nscenario 3: {ROUNDS} rounds of pg_terminate_backend under load killed {killed} "
        f"worker sessions; LISTEN reconnected {successes - 1} time(s); drained "
        f"{drained_after:.2f}s after the last kill; a new job ran {pickup:.2f}s after "
        f"NOTIFY (poll interval 60 s); {report.summary()}"
    )
    record_property("ledger", report.summary())
    report.assert_clean()
    assert killed >= ROUNDS * 2
    assert min(under_load) > 0, under_load  # every round hit a worker with jobs left
