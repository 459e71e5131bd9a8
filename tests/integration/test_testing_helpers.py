"""``kongtask.testing.running`` as a pytest fixture and ``reset_cron_state``, the patterns
the testing page (docs/testing.md) shows."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from kongtask import ConfigurationError, Runner, WorkerUtils
from kongtask.testing import ManualClock, reset_cron_state, running

ATTEMPTS: list[int] = []


def flaky(payload: Any, helpers: Any) -> None:
    ATTEMPTS.append(helpers.job.attempts)
    if helpers.job.attempts == 1:
        raise RuntimeError("the first attempt fails")


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime.now(UTC))


@pytest.fixture
def worker(db_url: str, clock: ManualClock) -> Iterator[Runner]:
    ATTEMPTS.clear()
    with running(tasks={"flaky": flaky}, connection_string=db_url, clock=clock) as runner:
        yield runner
    assert not runner.running


def test_a_retry_runs_once_the_clock_reaches_it(
    worker: Runner, clock: ManualClock, db_url: str, db: psycopg.Connection[Any]
) -> None:
    with WorkerUtils(db_url) as utils:
        utils.add_job("flaky")
    worker.join()
    assert ATTEMPTS == [1]
    clock.advance(3600)
    worker.join()
    assert ATTEMPTS == [1, 2]
    assert db.execute("select count(*) from graphile_worker._private_jobs").fetchone() == (0,)


TICKS: list[str] = []


def tick(payload: Any, helpers: Any) -> None:
    TICKS.append(payload["_cron"]["ts"])


def readme_cron_test(db_url: str, start: datetime, *, advance_s: float = 60) -> None:
    """The testing page's cron fixture and test in one function, so one test can run it often.

    The page starts its ManualClock at ``datetime.now(UTC)``; ``start`` is given
    here so that the runs below land in the same minute whatever the wall clock does.
    """
    reset_cron_state(db_url)  # the fixture's first line
    TICKS.clear()
    clock = ManualClock(start)
    with running(
        tasks={"tick": tick}, crontab="* * * * * tick", connection_string=db_url, clock=clock
    ) as worker:
        clock.advance(advance_s)  # the next minute passes by the worker's clock
        worker.join()  # its cron job was scheduled and has run
    assert len(TICKS) == advance_s // 60


def test_the_readme_cron_test_passes_again_in_the_same_minute(db_url: str) -> None:
    start = datetime.now(UTC).replace(second=30, microsecond=0)
    readme_cron_test(db_url, start)
    readme_cron_test(db_url, start)
    readme_cron_test(db_url, start + timedelta(seconds=10))


def test_the_readme_cron_test_passes_after_a_test_that_advanced_an_hour(db_url: str) -> None:
    start = datetime.now(UTC).replace(second=30, microsecond=0)
    readme_cron_test(db_url, start, advance_s=3600)
    readme_cron_test(db_url, start)


def test_reset_cron_state_forgets_only_cron_state(db_url: str, db: psycopg.Connection[Any]) -> None:
    with WorkerUtils(db_url) as utils:
        utils.add_cron_item("0 4 * * * report")
        utils.add_job("report")
    start = datetime.now(UTC).replace(second=30, microsecond=0)
    readme_cron_test(db_url, start)
    counts = """select (select count(*) from graphile_worker._private_known_crontabs),
                       (select count(*) from graphile_worker._kongtask_cron_history),
                       (select count(*) from graphile_worker._kongtask_cron_items),
                       (select count(*) from graphile_worker._private_jobs)"""
    assert db.execute(counts).fetchone() == (2, 1, 1, 1)
    reset_cron_state(db_url, schema="graphile_worker")
    assert db.execute(counts).fetchone() == (0, 0, 1, 1)  # stored items and jobs stay
    with pytest.raises(ConfigurationError, match="connection_string must be a string"):
        reset_cron_state(None)  # type: ignore[arg-type]
