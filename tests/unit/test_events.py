"""The event bus: one signal per name, delivery in order, receivers isolated, keyed by sender."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from kongtask import events
from kongtask.runtime.publisher import EventBus


def test_one_signal_per_graphile_worker_event_name() -> None:
    names = set(events.EVENT_NAMES)
    for name in (
        "pool:create",
        "pool:listen:connecting",
        "pool:release",
        "worker:create",
        "worker:release",
        "worker:stop",
        "job:start",
        "job:success",
        "job:error",
        "job:failed",
        "job:complete",
        "resetLocked:started",
        "resetLocked:success",
        "resetLocked:failure",
        "gracefulShutdown",
        "forcefulShutdown",
        "stop",
        "cron:schedule",
    ):
        assert name in names
        assert events.signal_for(name).name == name
        assert events.signal_for(name).__doc__
    assert len(names) == len(events.EVENT_NAMES)


@pytest.fixture
def bus() -> Any:
    sender = object()
    bus = EventBus(sender)
    bus.start()
    yield sender, bus
    bus.stop()


def test_events_arrive_in_order_and_a_raising_receiver_is_isolated(
    bus: Any, caplog: pytest.LogCaptureFixture
) -> None:
    sender, event_bus = bus
    got: list[int] = []

    def bad(sender: Any, **payload: Any) -> None:
        raise RuntimeError("oops")

    def good(sender: Any, **payload: Any) -> None:
        got.append(payload["n"])

    events.job_start.connect(bad, sender=sender)
    events.job_start.connect(good, sender=sender)
    try:
        for n in range(100):
            event_bus.emit(events.job_start, n=n)
        event_bus.flush()
    finally:
        events.job_start.disconnect(bad)
        events.job_start.disconnect(good)
    assert got == list(range(100))
    assert "Emitting job:start raised an error" in caplog.text


def test_receivers_hear_only_their_sender(bus: Any) -> None:
    sender, event_bus = bus
    other = object()
    mine: list[Any] = []
    theirs: list[Any] = []

    def on_mine(sender: Any, **payload: Any) -> None:
        mine.append(payload)

    def on_theirs(sender: Any, **payload: Any) -> None:
        theirs.append(payload)

    events.pool_create.connect(on_mine, sender=sender)
    events.pool_create.connect(on_theirs, sender=other)
    try:
        event_bus.emit(events.pool_create, pool_id="pool-x")
        event_bus.flush()
    finally:
        events.pool_create.disconnect(on_mine)
        events.pool_create.disconnect(on_theirs)
    assert mine == [{"pool_id": "pool-x"}]
    assert theirs == []


def test_a_slow_receiver_does_not_block_the_emitter(bus: Any) -> None:
    sender, event_bus = bus
    gate = threading.Event()
    delivered = threading.Event()

    def slow(sender: Any, **payload: Any) -> None:
        gate.wait(10)
        delivered.set()

    events.job_complete.connect(slow, sender=sender)
    try:
        for _ in range(1000):
            event_bus.emit(events.job_complete, job=None)  # returns at once
        assert not delivered.is_set()
        gate.set()
        event_bus.flush()
        assert delivered.is_set()
    finally:
        events.job_complete.disconnect(slow)


def test_events_without_receivers_are_dropped_at_the_source(bus: Any) -> None:
    _, event_bus = bus
    event_bus.emit(events.worker_get_job_empty, pool_id="p")
    assert len(event_bus._inbox) == 0
