"""The system clock: real time plus a tiny timer scheduler on one daemon thread.

Like psycopg_pool's scheduler, it is a heap of (deadline, action) and one
condition to wake early when an earlier timer arrives. Callbacks run on the
clock thread and only send messages, so one slow callback cannot hold up the
others for long. The thread starts with the first timer and stops with
:meth:`SystemClock.close`.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

__all__ = ["SystemClock", "Timer"]

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


class SystemClock:
    """The real clock (UTC wall time, ``time.monotonic``) with timers."""

    def __init__(self, *, name: str = "kongtask-clock") -> None:
        self._name = name
        self._heap: list[tuple[float, int, Timer]] = []
        self._counter = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

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
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)

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
            timer.fire()
