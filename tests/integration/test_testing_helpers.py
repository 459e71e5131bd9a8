"""``kongtask.testing.running`` as a pytest fixture, the pattern the README shows."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from kongtask import Runner, WorkerUtils
from kongtask.testing import ManualClock, running

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
