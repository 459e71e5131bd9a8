"""The cron actors against real PostgreSQL, driven by a ManualClock (no sleeps)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from blinker import NamedSignal
from psycopg.rows import dict_row

from kongtask.cron.service.cron_service import CronService
from kongtask.cron.source import CrontabSource
from kongtask.db.statements import Queries
from kongtask.testing import ManualClock

T0 = datetime(2021, 1, 1, 0, 0, tzinfo=UTC)


class Recorder:
    """Collects emitted events and lets a test wait for one, with a deadline."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._cond = threading.Condition()

    def __call__(self, signal: NamedSignal, **payload: Any) -> None:
        with self._cond:
            self.events.append((signal.name, payload))
            self._cond.notify_all()

    def names(self) -> list[str]:
        with self._cond:
            return [name for name, _ in self.events]

    def count(self, name: str) -> int:
        return self.names().count(name)

    def wait_for(self, name: str, count: int = 1, timeout_s: float = 10.0) -> dict[str, Any]:
        with self._cond:
            ok = self._cond.wait_for(
                lambda: sum(1 for n, _ in self.events if n == name) >= count, timeout_s
            )
            if not ok:
                raise AssertionError(f"no {count}x {name!r} within {timeout_s}s: {self.names()}")
            return [p for n, p in self.events if n == name][count - 1]


class Cron:
    """A CronService with its clock and recorder, for one test."""

    def __init__(self, db_url: str, source: CrontabSource, clock: ManualClock) -> None:
        self.clock = clock
        self.recorder = Recorder()

        def connect() -> AbstractContextManager[psycopg.Connection[Any]]:
            return psycopg.connect(db_url, autocommit=True)

        self.service = CronService(
            source=source,
            clock=clock,
            connect=connect,
            queries=Queries("graphile_worker"),
            emit=self.recorder,
        )

    def start(self) -> Cron:
        self.service.start()
        self.recorder.wait_for("cron:started")
        self.clock.wait_for_timers(1)
        return self

    def advance_to(self, when: datetime, scheduled: int | None = None) -> None:
        """Move the clock to ``when``; optionally wait until ``scheduled`` cron:scheduled events."""
        self.clock.advance((when - self.clock.now()).total_seconds())
        if scheduled is not None:
            self.recorder.wait_for("cron:scheduled", scheduled)


@pytest.fixture
def cron_factory(db_url: str) -> Iterator[Callable[..., Cron]]:
    with ExitStack() as stack:

        def make(crontab: str | None = None, *, start: datetime, file: Path | None = None) -> Cron:
            source = CrontabSource(file=file) if file else CrontabSource(text=crontab)
            cron = Cron(db_url, source, ManualClock(start))
            stack.callback(cron.service.stop)
            return cron

        yield make


def jobs(db: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    with db.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "select j.*, t.identifier as task from graphile_worker._private_jobs j "
            "join graphile_worker._private_tasks t on t.id = j.task_id order by j.run_at, j.id"
        ).fetchall()


def known(db: psycopg.Connection[Any]) -> dict[str, tuple[datetime, datetime | None]]:
    rows = db.execute(
        "select identifier, known_since, last_execution "
        "from graphile_worker._private_known_crontabs"
    ).fetchall()
    return {row[0]: (row[1], row[2]) for row in rows}


def remember(
    db: psycopg.Connection[Any], identifier: str, since: datetime, last: datetime | None
) -> None:
    db.execute(
        "insert into graphile_worker._private_known_crontabs "
        "(identifier, known_since, last_execution) values (%s, %s, %s)",
        (identifier, since, last),
    )


def test_registers_new_identifiers_without_jobs(cron_factory: Callable[..., Cron], db: Any) -> None:
    start = T0 + timedelta(hours=4, seconds=30)
    cron_factory("0 */4 * * * do_it ?fill=1d", start=start).start()
    assert known(db) == {"do_it": (start, None)}
    assert jobs(db) == []


@pytest.mark.parametrize(
    ("gap_hours", "expected"),
    [(5, ["04:00"]), (25, ["08:00", "12:00", "16:00", "20:00", "00:00", "04:00"])],
)
def test_backfills_known_identifiers_within_fill(
    cron_factory: Callable[..., Cron], db: Any, gap_hours: int, expected: list[str]
) -> None:
    start = T0 + timedelta(days=1, hours=5, seconds=30)  # 2021-01-02 05:00:30
    last = start.replace(second=0) - timedelta(hours=gap_hours)
    remember(db, "do_it", last - timedelta(days=7), last)
    cron = cron_factory("0 */4 * * * do_it ?fill=1d", start=start).start()
    rows = jobs(db)
    assert [row["run_at"].strftime("%H:%M") for row in rows] == expected
    assert all(row["payload"]["_cron"]["backfilled"] is True for row in rows)
    assert rows[-1]["payload"]["_cron"]["ts"] == "2021-01-02T04:00:00.000Z"
    assert cron.recorder.count("cron:backfill") == len(expected)
    assert known(db)["do_it"][1] == datetime(2021, 1, 2, 4, tzinfo=UTC)


def test_no_backfill_without_fill(cron_factory: Callable[..., Cron], db: Any) -> None:
    start = T0 + timedelta(hours=5, seconds=30)
    remember(db, "do_it", T0 - timedelta(days=1), T0)
    cron_factory("0 */4 * * * do_it", start=start).start()
    assert jobs(db) == []


def test_fires_at_the_right_minute(cron_factory: Callable[..., Cron], db: Any) -> None:
    cron = cron_factory(
        "0 4 * * * do_it {answer: 42}", start=T0 + timedelta(hours=3, minutes=59)
    ).start()
    cron.advance_to(T0 + timedelta(hours=3, minutes=59, seconds=59))
    assert jobs(db) == []
    cron.advance_to(T0 + timedelta(hours=4, seconds=1), scheduled=1)
    (job,) = jobs(db)
    assert job["task"] == "do_it"
    assert job["run_at"] == T0 + timedelta(hours=4)
    assert job["payload"] == {
        "answer": 42,
        "_cron": {"ts": "2021-01-01T04:00:00.000Z", "backfilled": False},
    }
    scheduled = cron.recorder.wait_for("cron:scheduled")
    assert scheduled["timestamp"] == int((T0 + timedelta(hours=4)).timestamp() * 1000)
    assert [j["identifier"] for j in scheduled["jobs_and_identifiers"]] == ["do_it"]


def test_overdue_timer_catches_up_minute_by_minute(
    cron_factory: Callable[..., Cron], db: Any
) -> None:
    cron = cron_factory("* * * * * tick", start=T0 + timedelta(seconds=30)).start()
    cron.advance_to(T0 + timedelta(minutes=5, seconds=10), scheduled=5)
    assert [row["run_at"].minute for row in jobs(db)] == [1, 2, 3, 4, 5]
    assert cron.recorder.count("cron:overdueTimer") == 4
    assert all(row["payload"]["_cron"]["backfilled"] is False for row in jobs(db))


def test_clock_going_back_never_schedules_a_minute_twice(
    cron_factory: Callable[..., Cron], db: Any
) -> None:
    cron = cron_factory("* * * * * tick", start=T0 + timedelta(seconds=30)).start()
    cron.advance_to(T0 + timedelta(minutes=1, seconds=1), scheduled=1)
    cron.clock.wait_for_timers(1)
    cron.clock.jump(timedelta(minutes=-3))  # wall clock goes back, time keeps flowing
    cron.clock.advance(60)
    cron.recorder.wait_for("cron:prematureTimer")
    assert len(jobs(db)) == 1
    cron.clock.wait_for_timers(1)
    cron.clock.advance(181)  # the wall clock reaches 00:02 again, three minutes later
    cron.recorder.wait_for("cron:scheduled", 2)
    assert [row["run_at"].minute for row in jobs(db)] == [1, 2]


def test_job_key_replaces_the_same_job(cron_factory: Callable[..., Cron], db: Any) -> None:
    cron = cron_factory("* * * * * tick ?jobKey=only-one", start=T0 + timedelta(seconds=30)).start()
    cron.advance_to(T0 + timedelta(minutes=3, seconds=1), scheduled=3)
    (job,) = jobs(db)
    assert job["key"] == "only-one"
    assert job["revision"] == 2
    assert job["run_at"] == T0 + timedelta(minutes=3)


def test_two_schedulers_schedule_each_minute_once(
    cron_factory: Callable[..., Cron], db: Any
) -> None:
    start = T0 + timedelta(seconds=30)
    first = cron_factory("* * * * * tick\n*/2 * * * * even", start=start).start()
    second = cron_factory("* * * * * tick\n*/2 * * * * even", start=start).start()
    for minute in range(1, 6):
        when = T0 + timedelta(minutes=minute, seconds=1)
        first.advance_to(when, scheduled=minute)
        second.advance_to(when, scheduled=minute)
    rows = jobs(db)
    ticks = [row["run_at"].minute for row in rows if row["task"] == "tick"]
    evens = [row["run_at"].minute for row in rows if row["task"] == "even"]
    assert ticks == [1, 2, 3, 4, 5]
    assert evens == [2, 4]


def test_time_zone_item_fires_on_wall_clock(cron_factory: Callable[..., Cron], db: Any) -> None:
    start = datetime(2021, 7, 1, 6, 59, 30, tzinfo=UTC)  # 08:59:30 in Berlin (CEST)
    cron = cron_factory("0 9 * * * report ?tz=Europe/Berlin", start=start).start()
    cron.advance_to(start + timedelta(seconds=31), scheduled=1)
    (job,) = jobs(db)
    assert job["run_at"] == datetime(2021, 7, 1, 7, 0, tzinfo=UTC)


def test_reload_adds_and_removes_items_without_skipping(
    cron_factory: Callable[..., Cron], db: Any, tmp_path: Path
) -> None:
    crontab = tmp_path / "crontab"
    crontab.write_text("* * * * * old_task\n")
    cron = cron_factory(file=crontab, start=T0 + timedelta(seconds=30)).start()
    cron.advance_to(T0 + timedelta(minutes=1, seconds=1), scheduled=1)

    crontab.write_text("* * * * * new_task\n")
    assert cron.service.reload() is True
    reload_event = cron.recorder.wait_for("cron:reload")
    assert reload_event["added"] == ["new_task"]
    assert reload_event["removed"] == ["old_task"]
    cron.advance_to(T0 + timedelta(minutes=2, seconds=1), scheduled=2)
    assert [(row["task"], row["run_at"].minute) for row in jobs(db)] == [
        ("old_task", 1),
        ("new_task", 2),
    ]
    assert "new_task" in known(db)


def test_bad_reload_keeps_the_previous_schedule(
    cron_factory: Callable[..., Cron], db: Any, tmp_path: Path
) -> None:
    crontab = tmp_path / "crontab"
    crontab.write_text("* * * * * keep_me\n")
    cron = cron_factory(file=crontab, start=T0 + timedelta(seconds=30)).start()
    crontab.write_text("# fine\n61 * * * * broken\n")
    assert cron.service.reload() is False
    failed = cron.recorder.wait_for("cron:reloadFailed")
    assert failed["error"].line == 2
    assert "Too large value '61'" in str(failed["error"])
    crontab.unlink()
    assert cron.service.reload() is False
    cron.advance_to(T0 + timedelta(minutes=1, seconds=1), scheduled=1)
    assert [row["task"] for row in jobs(db)] == ["keep_me"]


def test_database_outage_is_caught_up_not_skipped(
    cron_factory: Callable[..., Cron], db: Any, db_url: str
) -> None:
    cron = cron_factory("* * * * * tick", start=T0 + timedelta(seconds=30)).start()
    db.execute("alter table graphile_worker._private_known_crontabs rename to known_crontabs_away")
    cron.advance_to(T0 + timedelta(minutes=1, seconds=1))
    cron.clock.wait_for_timers(1)  # the write failed and a retry timer is armed
    db.execute("alter table graphile_worker.known_crontabs_away rename to _private_known_crontabs")
    cron.advance_to(T0 + timedelta(minutes=3, seconds=1), scheduled=3)
    assert [row["run_at"].minute for row in jobs(db)] == [1, 2, 3]


def test_backfill_of_a_keyed_item_replaces_minute_by_minute(
    cron_factory: Callable[..., Cron], db: Any
) -> None:
    remember(db, "k", T0 - timedelta(days=1), T0)
    start = T0 + timedelta(minutes=10, seconds=30)
    remember(db, "u", T0 - timedelta(days=1), T0 + timedelta(minutes=7))
    cron_factory(
        "* * * * * t ?id=k&fill=1h&jobKey=the-key\n* * * * * u ?fill=1h", start=start
    ).start()
    keyed = [row for row in jobs(db) if row["task"] == "t"]
    assert len(keyed) == 1
    assert keyed[0]["revision"] == 9  # minutes 1..10, each replacing the last
    assert keyed[0]["run_at"] == T0 + timedelta(minutes=10)
    plain = [row["run_at"].minute for row in jobs(db) if row["task"] == "u"]
    assert plain == [8, 9, 10]
    assert known(db)["k"][1] == T0 + timedelta(minutes=10)
