"""The local queue: a buffer of claimed jobs waiting for a free executor, shared by threads.

The claimer fills it with whole batches; executor threads pop one job at a
time. It is a ``queue.SimpleQueue``: put and get are implemented in C, and a
get that has to wait releases the GIL in C, so handing a batch of 500 jobs to
24 waiting executors costs no Python-level condition variable (that was a
sixth of the claimer's GIL time in a drain). It decides nothing: the claimer sets
the level it wants to hear about (:meth:`LocalQueue.wake_at`), and the first
executor that sees the buffer at or below it sends one ``BufferLow`` (the
callback) and clears the level, so a burst of pops costs one message.

Each job is buffered with the time its ownership was last known (see
:mod:`kongtask.jobs.ownership`), so an executor can tell cheaply whether
it must be confirmed before it starts.
"""

from __future__ import annotations

import queue
from collections.abc import Callable

from kongtask.job import Job

__all__ = ["LocalQueue", "Stamped"]

#: A buffered job and the time (``Ownership.now``) it was last known to be this pool's.
Stamped = tuple[Job, float]

#: Put once by ``close``; each executor that gets it puts it back for the next.
_CLOSED = None


class LocalQueue:
    """A buffer of claimed jobs that tells the claimer when it falls to a chosen level."""

    def __init__(self, size: int, on_low: Callable[[], None]) -> None:
        self.size = size
        self.low_water = size // 2
        self._on_low = on_low
        self._jobs: queue.SimpleQueue[Stamped | None] = queue.SimpleQueue()
        self._closed = False
        # -1: nobody wants to know. Written by the claimer and (to clear it) by
        # whichever executor reports; a duplicate report is harmless.
        self._wake_level = -1

    def __len__(self) -> int:
        return self._jobs.qsize()

    # --- executors ------------------------------------------------------------

    def take(self) -> Stamped | None:
        """The next job with its stamp, waiting if none is buffered; ``None`` once closed."""
        jobs = self._jobs
        if self._wake_level >= 0 and jobs.qsize() <= self._wake_level:
            # About to wait on an empty (or low) buffer: say so first.
            self._wake_level = -1
            self._on_low()
        item = jobs.get()
        if item is _CLOSED:
            jobs.put(_CLOSED)
            return None
        if jobs.qsize() <= self._wake_level:
            self._wake_level = -1
            self._on_low()
        return item

    # --- the claimer ------------------------------------------------------------

    def wake_at(self, level: int) -> bool:
        """Ask for a ``BufferLow`` once the buffer holds ``level`` jobs or fewer (-1: never).

        Returns True if it already does: the caller acts on that itself, since
        an executor that popped just before the level was set will not report.
        """
        self._wake_level = level
        if level >= 0 and self._jobs.qsize() <= level:
            self._wake_level = -1
            return True
        return False

    def put_many(self, jobs: list[Job], known_at: float) -> None:
        """Buffer jobs known to be this pool's at ``known_at`` (each put wakes one executor)."""
        put = self._jobs.put
        for job in jobs:
            put((job, known_at))

    def put_stamped(self, items: list[Stamped]) -> None:
        """Buffer jobs again with their own stamps (after an ownership check)."""
        put = self._jobs.put
        for item in items:
            put(item)

    def drain(self) -> list[Job]:
        """Remove and return every buffered job (to give them back)."""
        return [job for job, _ in self.drain_stamped()]

    def drain_stamped(self) -> list[Stamped]:
        """Remove and return every buffered job with its stamp."""
        drained: list[Stamped] = []
        get = self._jobs.get_nowait
        while True:
            try:
                item = get()
            except queue.Empty:
                return drained
            if item is _CLOSED:
                self._jobs.put(_CLOSED)
                return drained
            drained.append(item)

    def close(self) -> None:
        """Executors get ``None`` once the jobs buffered before this are taken."""
        if not self._closed:
            self._closed = True
            self._jobs.put(_CLOSED)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed
