"""The local queue: claimed jobs waiting for a free executor, shared by threads.

The claimer fills it with whole batches; executor threads pop one job at a
time without a lock on the fast path (``deque.popleft`` is atomic) and only
wait on the condition when it is empty. It also counts the jobs this pool
holds (``in_flight``: claimed, not yet recorded as done or returned), which
tells "run once" and ``Runner.join`` when everything runnable has been done.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable

from kongtask.job import Job

__all__ = ["FetchMode", "LocalQueue"]


class FetchMode:
    """What the last claim said about the database, deciding when to claim next."""

    #: The claim got all it asked for: claim again when the buffer runs low.
    FULL = "full"
    #: The claim got fewer: claim again once the buffer is empty.
    PARTIAL = "partial"
    #: Nothing was runnable: wait for a notification, a poll tick or a release.
    EMPTY = "empty"


class LocalQueue:
    """A buffer of claimed jobs with a low-water mark that asks for more."""

    def __init__(self, size: int, request_fetch: Callable[[], None]) -> None:
        self.size = size
        self.low_water = size // 2
        self._request_fetch = request_fetch
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._count_lock = threading.Lock()
        self._idle = threading.Condition(self._count_lock)
        self.in_flight = 0
        #: How many held jobs were ever finished (lets a claim see completions it raced).
        self.finished_total = 0
        self.mode = FetchMode.FULL
        self.fetch_requested = False
        #: Bumped whenever the buffer is filled (the TTL timer compares it).
        self.fill_generation = 0
        #: Raised by ``join`` callers; the claimer copies it into ``idle_mark``.
        self.join_requests = 0
        self.idle_mark = 0
        #: Bumped by the listener for every ``jobs:insert`` (and on reconnecting).
        self.inserts_notified = 0

    def __len__(self) -> int:
        return len(self._jobs)

    # --- executors ------------------------------------------------------------

    def take(self) -> Job | None:
        """The next job, waiting if none is buffered; ``None`` once closed."""
        jobs = self._jobs
        while True:
            try:
                job = jobs.popleft()
            except IndexError:
                pass
            else:
                if len(jobs) <= self.low_water and self.mode == FetchMode.FULL:
                    self._want_more()
                return job
            if self.mode != FetchMode.EMPTY:
                self._want_more()
            with self._cond:
                if self._closed:
                    return None
                if jobs:
                    continue
                self._cond.wait()

    def _want_more(self) -> None:
        if not self.fetch_requested:
            self.fetch_requested = True
            self._request_fetch()

    # --- the claimer ------------------------------------------------------------

    def put_many(self, jobs: list[Job]) -> None:
        """Buffer freshly claimed jobs and wake that many executors."""
        if not jobs:
            return
        with self._count_lock:
            self.in_flight += len(jobs)
        self.fill_generation += 1
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

    # --- bookkeeping ------------------------------------------------------------

    def finished(self, count: int) -> int:
        """Record that ``count`` held jobs were completed, failed or returned."""
        with self._count_lock:
            self.in_flight -= count
            self.finished_total += count
            if self.in_flight <= 0:
                self._idle.notify_all()
            return self.in_flight

    def mark_idle(self, mark: int) -> None:
        """The claimer saw nothing runnable and nothing held, for join requests up to ``mark``."""
        with self._count_lock:
            if mark > self.idle_mark:
                self.idle_mark = mark
            self._idle.notify_all()

    def request_join(self) -> int:
        """Register a join; returns the mark an empty claim must reach."""
        with self._count_lock:
            self.join_requests += 1
            return self.join_requests

    def wait_idle(self, mark: int, timeout_s: float) -> bool:
        """Wait until an empty claim covering ``mark`` happened; False on timeout."""
        with self._count_lock:
            return self._idle.wait_for(lambda: self.idle_mark >= mark, timeout_s)

    @property
    def wants_idle_claim(self) -> bool:
        """True when someone waits for an empty claim (a join, or run-once mode)."""
        return self.join_requests > self.idle_mark

    def snapshot(self) -> Iterable[Job]:
        """The buffered jobs (a copy), for diagnostics."""
        return list(self._jobs)
