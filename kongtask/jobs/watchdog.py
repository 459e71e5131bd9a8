"""The watchdog: one thread that ends job attempts which run past their timeout.

It exists only when some task has a timeout (a task's ``timeout_s`` or the
worker's default); without one no run is registered and the executors pay
nothing. It keeps one entry per executor slot, not a heap per job: an
executor writes its slot when a timed job starts and clears it when the job
ends, so memory is bounded by the concurrency however long the timeouts.
The thread wakes at the earliest deadline, and at least every shortest
timeout, so a job registered while it sleeps is never seen late.

One lock decides, for each timed run, who records its outcome: the executor
(:meth:`Watchdog.finish` returns True) or the watchdog (the run expired;
``finish`` returns False and the late result is ignored). A run that expired
is handed to ``expire`` on the watchdog's thread, which calls the run's
``abort`` (the abort event for a thread; an async executor may pass a
coroutine's cancel) and frees the slot.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["TimedRun", "Watchdog"]

logger = logging.getLogger(__name__)

_RUNNING, _FINISHED, _EXPIRED = 0, 1, 2
_MIN_PERIOD_S = 0.01


class TimedRun:
    """One attempt with a timeout: its slot, deadline, abort hook and what the executor
    needs to record it (``info``)."""

    __slots__ = ("abort", "deadline", "index", "info", "state", "timeout_s")

    def __init__(
        self, index: int, timeout_s: float, abort: Callable[[], None], info: Any = None
    ) -> None:
        self.index = index
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        #: Called once when the run expires: asks the handler to stop.
        self.abort = abort
        self.info = info
        self.state = _RUNNING


class Watchdog:
    """Watches one timed run per executor slot; calls ``expire(run)`` past its deadline."""

    def __init__(
        self,
        shortest_timeout_s: float,
        expire: Callable[[TimedRun], None],
        *,
        name: str,
    ) -> None:
        # Slot index -> its timed run; a dict, since a pool may add slots as it goes.
        self._slots: dict[int, TimedRun] = {}
        # The longest it sleeps with nothing due (never so short that it spins).
        self._shortest = max(shortest_timeout_s, _MIN_PERIOD_S)
        self._expire = expire
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        """Start the watchdog thread."""
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop watching (runs still going are left to finish on their own)."""
        self._stopped.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def watch(self, run: TimedRun) -> None:
        """Register ``run`` in its slot (called by the slot's executor before the handler)."""
        self._slots[run.index] = run

    def finish(self, run: TimedRun) -> bool:
        """The handler returned: True if the executor records the outcome, False if the run
        already expired (its outcome was recorded; this result is late and ignored)."""
        with self._lock:
            if run.state == _EXPIRED:
                return False
            run.state = _FINISHED
            if self._slots.get(run.index) is run:
                del self._slots[run.index]
            return True

    def _loop(self) -> None:
        slots = self._slots
        while not self._stopped.is_set():
            now = time.monotonic()
            wake = now + self._shortest
            expired: list[TimedRun] = []
            for run in list(slots.values()):
                if run.deadline > now:
                    wake = min(wake, run.deadline)
                    continue
                with self._lock:
                    if run.state == _RUNNING and slots.get(run.index) is run:
                        run.state = _EXPIRED
                        del slots[run.index]
                        expired.append(run)
            for run in expired:
                try:
                    self._expire(run)
                except Exception:
                    logger.exception("Ending a timed-out job failed")
            self._stopped.wait(max(0.0, wake - time.monotonic()))
