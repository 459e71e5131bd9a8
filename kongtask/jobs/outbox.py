"""The outbox: job outcomes waiting for the completer, filled from any thread.

Executors (and the claimer, for a job whose payload cannot be decoded) drop
outcomes here from their own threads. ``wake``, given at construction, is
called once when the outbox goes from empty to busy: it tells the completer to
flush, so a burst of outcomes costs one actor message, not one each. The
completer then takes whatever has piled up (:meth:`Outbox.take`) until it is empty.

Each outcome keeps the handler's run time (the executor measures it anyway)
in a list beside the jobs, for whoever observes the written batches (see
:class:`OutcomeObserver`); that costs an executor one list append, nothing more.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, NamedTuple, Protocol

import psycopg

from kongtask.db.statements import Queries
from kongtask.job import Job
from kongtask.protocols import Clock
from kongtask.runtime.parts import Part

__all__ = ["Outbox", "OutcomeObserver", "OutcomeObserverFactory", "Outcomes"]


class Outcomes(NamedTuple):
    """One batch taken from the outbox: successes and failures, each with run times.

    ``success_durations[i]`` is how long ``successes[i]``'s handler ran, in
    seconds (None when no handler ran: a job failed back at shutdown, say);
    the same for ``failure_durations`` and ``failures``.
    """

    successes: list[Job]
    success_durations: list[float | None]
    failures: list[tuple[Job, str, Any, bool]]
    failure_durations: list[float | None]


class OutcomeObserver(Protocol):
    """Told of each batch of outcomes once the completer has written it.

    Runs on the completer's thread, off the executors' path, so it must be
    quick (collect, and write elsewhere). Kongtask's cron history is one.
    """

    def observe(self, outcomes: Outcomes) -> None:
        """Look at a batch the completer has just written."""

    def start(self) -> None:
        """Start whatever the observer runs (a thread of its own, say)."""

    def stop(self) -> None:
        """Finish: write what is pending and stop."""

    def part(self) -> Part:
        """What the health probe sees of the observer."""


class OutcomeObserverFactory(Protocol):
    """Makes a run's observer once its pool is open."""

    def __call__(
        self,
        *,
        connect: Callable[[], AbstractContextManager[psycopg.Connection[Any]]],
        queries: Queries,
        clock: Clock,
    ) -> OutcomeObserver:
        """An observer writing over ``connect``, with ``queries``, telling time by ``clock``."""


class Outbox:
    """Outcomes waiting to be written; filled by executor threads."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._lock = threading.Lock()
        self.successes: list[Job] = []
        self.success_durations: list[float | None] = []
        self.failures: list[tuple[Job, str, Any, bool]] = []
        self.failure_durations: list[float | None] = []
        self._scheduled = False
        self._wake = wake

    def success(self, job: Job, duration_s: float | None = None) -> None:
        """Record that ``job`` succeeded (its handler ran ``duration_s`` seconds)."""
        with self._lock:
            self.successes.append(job)
            self.success_durations.append(duration_s)
            if self._scheduled:
                return
            self._scheduled = True
        self._wake()

    def failure(
        self,
        job: Job,
        message: str,
        replacement_payload: Any = None,
        permanent: bool = False,
        duration_s: float | None = None,
    ) -> None:
        """Record that ``job`` failed with ``message`` (and, for batches, its retry payload);
        ``permanent`` uses up its attempts (a cancelled job)."""
        with self._lock:
            self.failures.append((job, message, replacement_payload, permanent))
            self.failure_durations.append(duration_s)
            if self._scheduled:
                return
            self._scheduled = True
        self._wake()

    def take(self) -> Outcomes:
        """Everything recorded so far; clears the scheduled flag when empty."""
        with self._lock:
            taken = Outcomes(
                self.successes, self.success_durations, self.failures, self.failure_durations
            )
            if not taken.successes and not taken.failures:
                self._scheduled = False
            else:
                self.successes, self.success_durations = [], []
                self.failures, self.failure_durations = [], []
            return taken
