"""Shared helpers for the Scheduler tests: event capture, nodes on ManualClocks."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from kongtask import Scheduler, events
from kongtask.testing import ManualClock

T0 = datetime(2024, 1, 1, tzinfo=UTC)  # a Monday


class Heard:
    """Every cron event one Scheduler sends, with a wait that has a deadline."""

    NAMES = (
        "cron:scheduled",
        "cron:backfill",
        "cron:started",
        "cron:reload",
        "cron:reloadFailed",
        "cron:itemFailed",
        "cron:skipped",
        "cron:clockSkew",
    )

    def __init__(self, sender: Any) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._cond = threading.Condition()
        self._receivers = []
        for name in self.NAMES:
            receiver = self._make(name)
            events.signal_for(name).connect(receiver, sender=sender, weak=False)
            self._receivers.append((name, receiver))
        self._sender = sender

    def _make(self, name: str) -> Any:
        def receive(_sender: Any, **payload: Any) -> None:
            with self._cond:
                self.events.append((name, payload))
                self._cond.notify_all()

        return receive

    def of(self, name: str) -> list[dict[str, Any]]:
        with self._cond:
            return [payload for n, payload in self.events if n == name]

    def wait_for(self, name: str, count: int = 1, timeout_s: float = 15.0) -> dict[str, Any]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.of(name)) >= count, timeout_s):
                raise AssertionError(f"no {count}x {name}: {[n for n, _ in self.events]}")
            return self.of(name)[count - 1]

    def close(self) -> None:
        for name, receiver in self._receivers:
            events.signal_for(name).disconnect(receiver, sender=self._sender)


class Node:
    """A started Scheduler with its ManualClock and what it heard."""

    def __init__(self, scheduler: Scheduler, clock: ManualClock) -> None:
        self.scheduler = scheduler
        self.clock = clock
        self.heard = Heard(scheduler)

    def start(self) -> Node:
        self.scheduler.start()
        self.heard.wait_for("cron:started")
        self.clock.wait_for_timers(1)
        return self

    def advance(self, seconds: float, scheduled: int | None = None) -> None:
        self.clock.advance(seconds)
        if scheduled is not None:
            self.heard.wait_for("cron:scheduled", scheduled)


class NodeFactory:
    """Makes Schedulers on ManualClocks for one test and stops them all afterwards."""

    def __init__(self, db_url: str) -> None:
        self._db_url = db_url
        self._made: list[Node] = []

    def __call__(self, start: datetime, **options: Any) -> Node:
        clock = ManualClock(start)
        options.setdefault("connection_string", self._db_url)
        node = Node(Scheduler(clock=clock, install_signal_handlers=False, **options), clock)
        self._made.append(node)
        return node

    def close(self) -> None:
        for node in self._made:
            node.scheduler.stop(30)
            node.heard.close()


def job_minutes(db: psycopg.Connection[Any], task: str = "tick") -> list[str]:
    rows = db.execute(
        "select run_at from graphile_worker.jobs where task_identifier = %s order by run_at",
        (task,),
    ).fetchall()
    return [row[0].astimezone(UTC).strftime("%H:%M") for row in rows]


def remember(db: psycopg.Connection[Any], identifier: str, last: datetime) -> None:
    db.execute(
        "insert into graphile_worker._private_known_crontabs values (%s, %s, %s)",
        (identifier, last - timedelta(days=1), last),
    )
