"""ManualClock fires timers only when advanced, in order, including chained timers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from kongtask.protocols import Clock
from kongtask.runtime.clock import SystemClock
from kongtask.testing import ManualClock


def test_timers_fire_in_order_when_due() -> None:
    clock = ManualClock(datetime(2024, 1, 1, tzinfo=UTC))
    fired: list[str] = []
    clock.call_later(10, lambda: fired.append("b"))
    clock.call_later(5, lambda: fired.append("a"))
    cancelled = clock.call_later(7, lambda: fired.append("never"))
    cancelled.cancel()
    clock.advance(4.9)
    assert fired == []
    clock.advance(5.1)
    assert fired == ["a", "b"]
    assert clock.now() == datetime(2024, 1, 1, tzinfo=UTC) + timedelta(seconds=10)
    assert clock.monotonic() == pytest.approx(10)


def test_timers_scheduled_by_timers_fire_within_the_same_advance() -> None:
    clock = ManualClock()
    fired: list[float] = []

    def tick() -> None:
        fired.append(clock.monotonic())
        if len(fired) < 3:
            clock.call_later(1, tick)

    clock.call_later(1, tick)
    clock.advance(10)
    assert fired == [1, 2, 3]
    assert clock.pending == 0


def test_both_clocks_satisfy_the_protocol() -> None:
    assert isinstance(ManualClock(), Clock)
    system = SystemClock()
    try:
        assert isinstance(system, Clock)
        assert system.now().tzinfo is not None
    finally:
        system.close()


def test_system_clock_runs_timers_on_its_thread() -> None:
    import threading

    clock = SystemClock()
    done = threading.Event()
    try:
        clock.call_later(0.01, done.set)
        assert done.wait(5)
    finally:
        clock.close()


def test_naive_start_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        ManualClock(datetime(2024, 1, 1))
