"""Tools for testing code that uses kongtask, without sleeping.

``ManualClock`` stands in for the system clock: time moves only when the test
calls :meth:`ManualClock.advance`, and timers due by then fire in order, in
the calling thread. A Runner given one also uses it for job readiness (as
graphile-worker's ``useNodeTime``): a job is ready once the database's time
or the clock has reached its ``run_at``, so ``advance()`` makes retries and
delayed jobs due. ``join`` waits until a Runner has nothing left to do.
``reset_cron_state`` gives each cron test a clean slate in a shared database.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Unpack

from kongtask.db.connecting import connect
from kongtask.db.conninfo import resolve_schema
from kongtask.db.migrate import migrate
from kongtask.db.statements import Queries
from kongtask.runtime.clock import Timer
from kongtask.validate import check_connection_string

if TYPE_CHECKING:
    from kongtask.runner import Runner, RunnerOptions

__all__ = ["ManualClock", "join", "reset_cron_state", "running"]


class ManualClock:
    """A clock that moves only when told; implements :class:`kongtask.protocols.Clock`.

    Start it at a fixed instant for reproducible tests; ``advance`` runs every
    timer that falls due, including timers those timers schedule.
    """

    def __init__(self, start: datetime | None = None) -> None:
        if start is None:
            start = datetime(2021, 1, 1, tzinfo=UTC)
        if start.utcoffset() is None:
            raise ValueError("ManualClock start must be timezone-aware")
        self._now = start
        self._monotonic = 0.0
        self._heap: list[tuple[float, int, Timer]] = []
        self._counter = itertools.count()
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)

    def now(self) -> datetime:
        """The clock's current time."""
        with self._lock:
            return self._now

    def monotonic(self) -> float:
        """Seconds advanced since the clock was made."""
        with self._lock:
            return self._monotonic

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> Timer:
        """Schedule ``callback`` to run when the clock is advanced past its time."""
        timer = Timer(callback)
        with self._lock:
            heapq.heappush(self._heap, (self._monotonic + delay_s, next(self._counter), timer))
            self._changed.notify_all()
        return timer

    @property
    def pending(self) -> int:
        """How many timers are scheduled and not cancelled."""
        with self._lock:
            return sum(1 for _, _, timer in self._heap if not timer.cancelled)

    def next_deadline_s(self) -> float | None:
        """Seconds until the next live timer is due, or ``None`` if there is none."""
        with self._lock:
            live = [due for due, _, timer in self._heap if not timer.cancelled]
            return min(live) - self._monotonic if live else None

    def wait_for_timers(self, count: int = 1, timeout_s: float = 10.0) -> None:
        """Block until at least ``count`` live timers are scheduled (or fail after timeout)."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while self.pending < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"expected {count} timer(s), have {self.pending}")
                self._changed.wait(remaining)

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` and fire every timer due by then."""
        if seconds < 0:
            raise ValueError("a ManualClock only moves forward")
        with self._lock:
            target = self._monotonic + seconds
        while True:
            with self._lock:
                if not self._heap or self._heap[0][0] > target:
                    self._now += timedelta(seconds=target - self._monotonic)
                    self._monotonic = target
                    return
                due, _, timer = heapq.heappop(self._heap)
                self._now += timedelta(seconds=max(0.0, due - self._monotonic))
                self._monotonic = max(self._monotonic, due)
            timer.fire()

    def jump(self, delta: timedelta) -> None:
        """Move the wall clock by ``delta`` (either way) without letting time pass.

        This is what NTP corrections and suspended machines do: ``now()``
        changes, monotonic time and pending timers do not.
        """
        with self._lock:
            self._now += delta

    def close(self) -> None:
        """Forget every pending timer (they will never fire)."""
        with self._lock:
            for _, _, timer in self._heap:
                timer.cancel()
            self._heap.clear()
            self._changed.notify_all()


def join(runner: Runner, timeout_s: float = 30.0) -> None:
    """Wait until ``runner`` has no runnable job claimed, buffered, running or unrecorded.

    Jobs that become runnable later (a retry's back-off, a future ``run_at``)
    are not waited for. Raises ``TimeoutError`` after ``timeout_s``.
    """
    runner.join(timeout_s)


def reset_cron_state(connection_string: str, *, schema: str | None = None) -> None:
    """Forget every cron item's registration and last run in ``schema``, and kongtask's
    cron history and gaps there, so the next test's cron starts from scratch.

    Cron remembers in the database the last minute it scheduled for each item, so
    that no minute ever runs twice. A test whose ManualClock starts at ``now()``
    after another test in the same database scheduled that minute, or advanced
    an hour, would otherwise see nothing scheduled. Call it before starting the
    Runner or Scheduler (the first line of the fixture); never on a database
    that production cron nodes use. The schema is migrated first if needed, as a
    Runner's start would; stored cron items (``add_cron_item``) and jobs stay.
    """
    check_connection_string(connection_string, allow_none=False)
    name = resolve_schema(schema)
    with connect(connection_string) as conn:
        migrate(conn, name)
        with conn.transaction():
            conn.execute(Queries(name).cron_reset)


@contextmanager
def running(**options: Unpack[RunnerOptions]) -> Iterator[Runner]:
    """A started Runner for the ``with`` block (a pytest fixture's body); stopped after.

    Takes the options of :func:`kongtask.run`; signal handlers are left alone
    unless ``install_signal_handlers`` (or ``settings``) says otherwise. The Runner is stopped
    gracefully on the way out and any fatal error it met is raised then, so a
    test cannot pass over a worker that died. The pattern::

        @pytest.fixture
        def clock():
            return ManualClock(datetime.now(UTC))

        @pytest.fixture
        def worker(clock):
            with running(tasks=TASKS, connection_string=URL, clock=clock) as runner:
                yield runner

        def test_retry(worker, clock):
            ...                   # add a job that fails once
            worker.join()         # its first attempt ran and was recorded
            clock.advance(3600)   # its retry is due by the worker's clock
            worker.join()         # and has run
    """
    from kongtask.runner import Runner

    settings = options.get("settings")
    if settings is None:
        options.setdefault("install_signal_handlers", False)
    elif settings.install_signal_handlers is None:
        options["settings"] = replace(settings, install_signal_handlers=False)
    runner = Runner(**options).start()
    try:
        yield runner
    finally:
        runner.stop(30)
