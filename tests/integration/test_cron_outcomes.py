"""The cron history's job outcomes, as the completer's written batches report them.

The executors know nothing of cron: the outcome recorder observes what the
completer wrote. Its finish time comes from the run's (injectable) clock, its
duration is the handler's run time, and a failure's error is exactly the
job's ``last_error`` (one sanitiser for both), on real PostgreSQL.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import psycopg

import kongtask
from kongtask import WorkerUtils
from kongtask.jobs.last_error import MAX_LAST_ERROR_CHARS
from kongtask.testing import ManualClock

from .cron_support import T0
from .worker_support import wait_until

HANDLER_S = 0.2


def test_outcomes_use_the_run_clock_the_handler_time_and_the_jobs_last_error(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    nasty = "bad\x00byte " + "x" * (MAX_LAST_ERROR_CHARS + 500)

    def slow(payload: Any, helpers: Any) -> None:
        threading.Event().wait(HANDLER_S)  # the run time the history must show

    def broken(payload: Any, helpers: Any) -> None:
        raise RuntimeError(nasty)

    clock = ManualClock(T0 + timedelta(hours=3, minutes=59, seconds=30))
    with (
        kongtask.run(
            tasks={"slow": slow, "broken": broken},
            connection_string=db_url,
            crontab="0 4 * * * slow\n0 4 * * * broken ?max=2",
            clock=clock,
            install_signal_handlers=False,
        ) as runner,
        WorkerUtils(db_url) as utils,
    ):
        clock.wait_for_timers(1)
        clock.advance(31)
        # The clock stands still from here: every finish time must be exactly this.
        now = clock.now()

        def finished() -> bool:
            runs = utils.cron_history()
            return len(runs) == 2 and all(run.outcome != "scheduled" for run in runs)

        wait_until(finished, what="both outcomes recorded")
        runs = {run.identifier: run for run in utils.cron_history()}
        runner.stop()
    slow_run, broken_run = runs["slow"], runs["broken"]
    assert slow_run.outcome == "success"
    assert slow_run.finished_at == now and broken_run.finished_at == now
    assert slow_run.duration_s is not None and slow_run.duration_s >= HANDLER_S
    assert broken_run.outcome == "failure" and broken_run.attempts == 1
    row = db.execute(
        "select last_error from graphile_worker._private_jobs where id = %s",
        (broken_run.job_id,),
    ).fetchone()
    assert row is not None
    assert broken_run.error == row[0]
    assert broken_run.error.startswith("bad\\x00byte xxx")
    assert len(broken_run.error) <= MAX_LAST_ERROR_CHARS and "[truncated:" in broken_run.error
