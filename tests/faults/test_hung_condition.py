"""A cron condition that hangs, on the real clock: the other items stay on time.

A Scheduler on real time (its wall clock shifted so that a minute boundary
comes two seconds after the start) schedules 20 ``* * * * *`` items and one
whose condition never answers (a feature-flag service that hangs), across
three minute boundaries. The figures come from the cron history: when each
minute's rows were written (``written_at``, the database's clock) against the
real instant of that minute.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from kongtask import CronItem, Firing, Scheduler
from kongtask.cron.schedule import floor_minute
from kongtask.runtime.clock import SystemClock
from tests.integration.cron_support import Heard

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]

OTHER_ITEMS = 20
MINUTES = 3


class ShiftedClock(SystemClock):
    """Real time and real timers, with the wall clock moved by ``offset``."""

    def __init__(self, offset: timedelta) -> None:
        super().__init__(name="kongtask-test-shifted-clock")
        self.offset = offset

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset


def test_a_hung_condition_leaves_the_other_items_on_time(db_url: str) -> None:
    answer = threading.Event()
    calls: list[datetime] = []

    def flag_service(firing: Firing) -> bool:
        calls.append(firing.scheduled_at)
        answer.wait(600)  # never answers while the test runs
        return True

    real = datetime.now(UTC)
    clock = ShiftedClock(floor_minute(real) + timedelta(seconds=58) - real)
    crontab = "\n".join(f"* * * * * tick ?id=tick_{n}" for n in range(OTHER_ITEMS))
    scheduler = Scheduler(
        connection_string=db_url,
        crontab=crontab,
        cron_items=[CronItem("gated", "* * * * *", condition=flag_service)],
        clock=clock,
        clock_skew_tolerance_s=120.0,  # the shift is on purpose
        install_signal_handlers=False,
    )
    heard = Heard(scheduler)
    try:
        with scheduler:
            heard.wait_for("cron:scheduled", MINUTES, timeout_s=60.0 * MINUTES + 30)
            stuck = [t for t in threading.enumerate() if t.name == "kongtask-cron-condition-gated"]
    finally:
        answer.set()
        heard.close()
        clock.close()
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "select identifier, scheduled_at, outcome, error, written_at"
            " from graphile_worker._kongtask_cron_history order by scheduled_at, identifier"
        ).fetchall()
    minutes = sorted({row[1] for row in rows})[:MINUTES]
    late: dict[datetime, dict[str, Any]] = {}
    for minute in minutes:
        boundary = minute - clock.offset  # the real instant of this minute
        others = [r for r in rows if r[1] == minute and r[0] != "gated"]
        (gated,) = [r for r in rows if r[1] == minute and r[0] == "gated"]
        late[minute] = {
            "others_s": max((r[4] - boundary).total_seconds() for r in others),
            "others": sorted({r[2] for r in others}),
            "gated_s": (gated[4] - boundary).total_seconds(),
            "gated": (gated[2], gated[3]),
        }
        assert len(others) == OTHER_ITEMS
    for minute, figures in late.items():
        print(
            f"{minute:%H:%M}: {OTHER_ITEMS} other items written {figures['others_s']:.3f} s"
            f" after the minute; the gated one {figures['gated_s']:.3f} s after, {figures['gated']}"
        )
    first, *rest = late.values()
    assert first["gated"] == ("skipped", "timed out after 5 s")
    assert 5.0 <= first["gated_s"] < 7.0
    still_running = (
        f"its condition is still running (the call for {minutes[0]:%Y-%m-%dT%H:%M:%SZ}"
        " has not returned)"
    )
    for figures in rest:
        assert figures["gated"] == ("skipped", still_running)
        assert figures["gated_s"] < 1.0  # skipped at once, no new call
    for figures in late.values():
        assert figures["others"] == ["scheduled"]
        assert figures["others_s"] < 1.0  # on time, the hung condition notwithstanding
    assert calls == [minutes[0]]  # one call in three minutes
    assert len(stuck) == 1  # one thread for the stuck item, not one per minute
