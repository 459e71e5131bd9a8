"""Runner.join() with a ManualClock: cron jobs of passed minutes and due retries have run."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

import psycopg

import kongtask
from kongtask.testing import ManualClock


def test_join_waits_for_the_cron_job_of_a_minute_just_passed(db_url: str) -> None:
    ran: list[Any] = []
    clock = ManualClock(datetime(2030, 6, 1, 12, 0, 30, tzinfo=UTC))
    with kongtask.Runner(
        tasks={"tick": lambda payload, helpers: ran.append(payload["_cron"]["ts"])},
        connection_string=db_url,
        crontab="* * * * * tick",
        clock=clock,
        install_signal_handlers=False,
    ) as runner:
        runner.join(30)
        assert ran == []  # 12:01 has not come yet on the Runner's clock
        clock.advance(31)  # 12:01:01
        runner.join(30)
        assert len(ran) == 1 and ran[0].startswith("2030-06-01T12:01:00")
        clock.advance(120)  # 12:03:01: two more minutes
        runner.join(30)
        assert [ts[:19] for ts in ran] == [
            "2030-06-01T12:01:00",
            "2030-06-01T12:02:00",
            "2030-06-01T12:03:00",
        ]


def test_join_after_advance_runs_the_due_retry(db_url: str, db: psycopg.Connection[Any]) -> None:
    attempts: list[int] = []
    succeeded = threading.Event()

    def flaky(payload: Any, helpers: Any) -> None:
        attempts.append(helpers.job.attempts)
        if len(attempts) == 1:
            raise RuntimeError("first try fails")
        succeeded.set()

    clock = ManualClock(datetime.now(UTC))
    with kongtask.Runner(
        tasks={"flaky": flaky},
        connection_string=db_url,
        clock=clock,
        install_signal_handlers=False,
    ) as runner:
        runner.add_job("flaky")
        runner.join(30)
        assert attempts == [1]  # the retry is due in exp(1) s on the Runner's clock
        clock.advance(3600)
        runner.join(30)
        assert attempts == [1, 2] and succeeded.is_set()
    assert db.execute("select count(*) from graphile_worker.jobs").fetchone() == (0,)
