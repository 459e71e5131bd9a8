"""The outbox: job outcomes waiting for the completer, filled from any thread.

Executors (and the claimer, for a job whose payload cannot be decoded) drop
outcomes here from their own threads. ``wake``, given at construction, is
called once when the outbox goes from empty to busy: it tells the completer to
flush, so a burst of outcomes costs one actor message, not one each. The
completer then takes whatever has piled up (:meth:`Outbox.take`) until it is empty.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from kongtask.job import Job

__all__ = ["Outbox"]


class Outbox:
    """Outcomes waiting to be written; filled by executor threads."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._lock = threading.Lock()
        self.successes: list[Job] = []
        self.failures: list[tuple[Job, str, Any, bool]] = []
        self._scheduled = False
        self._wake = wake

    def success(self, job: Job) -> None:
        """Record that ``job`` succeeded."""
        with self._lock:
            self.successes.append(job)
            if self._scheduled:
                return
            self._scheduled = True
        self._wake()

    def failure(
        self, job: Job, message: str, replacement_payload: Any = None, permanent: bool = False
    ) -> None:
        """Record that ``job`` failed with ``message`` (and, for batches, its retry payload);
        ``permanent`` uses up its attempts (a cancelled job)."""
        with self._lock:
            self.failures.append((job, message, replacement_payload, permanent))
            if self._scheduled:
                return
            self._scheduled = True
        self._wake()

    def take(self) -> tuple[list[Job], list[tuple[Job, str, Any, bool]]]:
        """Everything recorded so far; clears the scheduled flag when empty."""
        with self._lock:
            successes, failures = self.successes, self.failures
            if not successes and not failures:
                self._scheduled = False
            else:
                self.successes, self.failures = [], []
            return successes, failures
