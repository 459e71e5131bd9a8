"""The system clock: timers reach the Clock actor as tick messages, in deadline order."""

from __future__ import annotations

import threading

from kongtask.runtime.clock import SystemClock


def test_due_timers_run_on_the_clock_actor_in_order() -> None:
    clock = SystemClock(name="test-clock")
    ran: list[tuple[str, str]] = []
    done = threading.Event()

    def record(label: str) -> None:
        ran.append((label, threading.current_thread().name))
        if len(ran) == 3:
            done.set()

    clock.call_later(0.03, lambda: record("late"))
    clock.call_later(0.01, lambda: record("early"))
    cancelled = clock.call_later(0.02, lambda: record("cancelled"))
    cancelled.cancel()
    clock.call_later(0.02, lambda: record("middle"))
    try:
        assert done.wait(5.0)
        assert [label for label, _ in ran] == ["early", "middle", "late"]
        assert {name for _, name in ran} == {clock._actor_thread.name}  # type: ignore[union-attr]
        assert clock._actor_thread.name.startswith("ClockActor")  # type: ignore[union-attr]
    finally:
        clock.close()
    actor = clock._actor
    assert actor is not None
    assert not actor.is_alive()


def test_close_from_a_callback_does_not_hang() -> None:
    clock = SystemClock(name="test-clock")
    closed = threading.Event()

    def close() -> None:
        clock.close()
        closed.set()

    clock.call_later(0.0, close)
    assert closed.wait(5.0)
