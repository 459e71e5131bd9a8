"""The local queue: a buffer of claimed jobs waiting for a free executor, shared by threads.

The claimer fills it with whole batches; executor threads pop one job at a
time without a lock on the fast path (``deque.popleft`` is atomic) and only
wait on the condition when it is empty. It decides nothing: the claimer sets
the level it wants to hear about (:meth:`LocalQueue.wake_at`), and the first
executor that sees the buffer at or below it sends one ``BufferLow`` (the
callback) and clears the level, so a burst of pops costs one message.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from kongtask.job import Job

__all__ = ["LocalQueue"]


class LocalQueue:
    """A buffer of claimed jobs that tells the claimer when it falls to a chosen level."""

    def __init__(self, size: int, on_low: Callable[[], None]) -> None:
        self.size = size
        self.low_water = size // 2
        self._on_low = on_low
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        # -1: nobody wants to know. Written by the claimer and (to clear it) by
        # whichever executor reports; a duplicate report is harmless.
        self._wake_level = -1

    def __len__(self) -> int:
        return len(self._jobs)

    # --- executors ------------------------------------------------------------

    def take(self) -> Job | None:
        """The next job, waiting if none is buffered; ``None`` once closed."""
        jobs = self._jobs
        while True:
            try:
                job: Job | None = jobs.popleft()
            except IndexError:
                job = None
            if len(jobs) <= self._wake_level:
                self._wake_level = -1
                self._on_low()
            if job is not None:
                return job
            with self._cond:
                if self._closed:
                    return None
                if jobs:
                    continue
                self._cond.wait()

    # --- the claimer ------------------------------------------------------------

    def wake_at(self, level: int) -> bool:
        """Ask for a ``BufferLow`` once the buffer holds ``level`` jobs or fewer (-1: never).

        Returns True if it already does: the caller acts on that itself, since
        an executor that popped just before the level was set will not report.
        """
        self._wake_level = level
        if level >= 0 and len(self._jobs) <= level:
            self._wake_level = -1
            return True
        return False

    def put_many(self, jobs: list[Job]) -> None:
        """Buffer freshly claimed jobs and wake that many executors."""
        if not jobs:
            return
        self._jobs.extend(jobs)
        with self._cond:
            self._cond.notify(len(jobs))

    def drain(self) -> list[Job]:
        """Remove and return every buffered job (to give them back)."""
        drained: list[Job] = []
        while True:
            try:
                drained.append(self._jobs.popleft())
            except IndexError:
                return drained

    def close(self) -> None:
        """Wake every waiting executor; they get ``None`` once the buffer is empty."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed
