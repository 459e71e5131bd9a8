"""The system clock: real time, and timers delivered by the Clock actor as tick messages.

Like psycopg_pool's scheduler, a waker thread keeps a heap of (deadline, timer)
and one condition to wake early when an earlier timer arrives. When a timer is
due the waker does not run it: it sends a ``Tick`` message to the
:class:`ClockActor`, the design card's clock actor, which runs the callback on
its own thread. Callbacks only send messages (a cron minute, a poll, a sweep),
so one slow callback cannot hold up the others for long, and a burst of due
timers is a burst of messages in one mailbox. The thread and the actor start
with the first timer and stop with :meth:`SystemClock.close`.

The cost of the extra hop is one pykka ``tell`` per timer firing (about 15 µs on
the development machine); timers fire a few times a second at most, so it does
not show in any benchmark.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import pykka

from kongtask.runtime.actor import Actor, ErrorPolicy

__all__ = ["ClockActor", "SystemClock", "Tick", "Timer"]

logger = logging.getLogger(__name__)


class Timer:
    """A scheduled callback; :meth:`cancel` keeps it from running."""

    __slots__ = ("_callback", "cancelled")

    def __init__(self, callback: Callable[[], None]) -> None:
        self._callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        """Call the callback off (harmless if it already ran)."""
        self.cancelled = True

    def fire(self) -> None:
        """Run the callback unless cancelled; its errors are logged, not raised."""
        if self.cancelled:
            return
        self.cancelled = True
        try:
            self._callback()
        except Exception:
            logger.exception("A timer callback raised")


@dataclass(frozen=True, slots=True)
class Tick:
    """A due timer, sent by the waker thread to the clock actor."""

    timer: Timer


class ClockActor(Actor):
    """Runs due timers' callbacks, one ``Tick`` message each, in deadline order."""

    # Timer.fire logs a callback's error itself; one timer never stops the others.
    error_policy = ErrorPolicy.LOG_AND_CONTINUE

    def __init__(self, started: Callable[[threading.Thread], None]) -> None:
        super().__init__()
        self._started = started

    def on_start(self) -> None:
        self._started(threading.current_thread())

    def handle(self, message: Tick) -> None:
        match message:
            case Tick(timer):
                timer.fire()  # logs, never raises


class SystemClock:
    """The real clock (UTC wall time, ``time.monotonic``) with timers."""

    def __init__(self, *, name: str = "kongtask-clock") -> None:
        self._name = name
        self._heap: list[tuple[float, int, Timer]] = []
        self._counter = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._actor: pykka.ActorRef[ClockActor] | None = None
        self._actor_thread: threading.Thread | None = None
        self._closed = False

    def _set_actor_thread(self, thread: threading.Thread) -> None:
        self._actor_thread = thread

    def now(self) -> datetime:
        """The current UTC time."""
        return datetime.now(UTC)

    def monotonic(self) -> float:
        """``time.monotonic()``."""
        return time.monotonic()

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> Timer:
        """Run ``callback`` on the clock thread after ``delay_s`` seconds."""
        timer = Timer(callback)
        with self._cond:
            if self._closed:
                timer.cancel()
                return timer
            heapq.heappush(self._heap, (time.monotonic() + delay_s, next(self._counter), timer))
            if self._thread is None:
                self._actor = ClockActor.start(self._set_actor_thread)
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()
        return timer

    def close(self) -> None:
        """Cancel every pending timer and stop the thread (waits for it briefly)."""
        with self._cond:
            self._closed = True
            for _, _, timer in self._heap:
                timer.cancel()
            self._heap.clear()
            self._cond.notify()
            thread, actor = self._thread, self._actor
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)
        if actor is not None:
            # From a callback (the actor's own thread) a blocking stop would wait on itself.
            try:
                on_actor = threading.current_thread() is self._actor_thread
                actor.stop(block=not on_actor, timeout=None if on_actor else 5.0)
            except (pykka.ActorDeadError, pykka.Timeout):
                pass

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed:
                    if self._heap:
                        wait = self._heap[0][0] - time.monotonic()
                        if wait <= 0:
                            break
                        self._cond.wait(wait)
                    else:
                        self._cond.wait()
                if self._closed:
                    return
                _, _, timer = heapq.heappop(self._heap)
                actor = self._actor
            if actor is None:  # pragma: no cover - the actor starts with the thread
                timer.fire()
                continue
            try:
                actor.tell(Tick(timer))
            except pykka.ActorDeadError:
                return
