"""Record the outcomes of cron jobs that this process's worker ran.

The executor tells the recorder when a job whose payload carries ``_cron``
starts and finishes (:meth:`OutcomeRecorder.started` / :meth:`finished`: two
dictionary updates under a lock, and nothing at all for other jobs, so a
worker pays no event traffic for the history). The recorder writes the
outcomes into ``_kongtask_cron_history`` in batches (one statement per flush)
from a thread of its own, so a slow database never holds up an executor. A
job scheduled by a Node worker has no history row; its update simply matches
nothing.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any

import psycopg

from kongtask.db.statements import Queries
from kongtask.runtime.parts import Part, ThreadsPart

__all__ = ["OutcomeRecorder"]

logger = logging.getLogger("kongtask.cron")

_FLUSH_INTERVAL_S = 1.0
_MAX_ERROR_LENGTH = 2000


def is_cron_job(job: Any) -> bool:
    """Whether ``job`` was scheduled by a cron node (its payload carries ``_cron``)."""
    payload = getattr(job, "payload", None)
    return type(payload) is dict and isinstance(payload.get("_cron"), dict)


def _clean(error: Any) -> str | None:
    if error is None:
        return None
    text = str(error).replace("\x00", "\\u0000")
    text = text.encode("utf-8", "replace").decode("utf-8")
    return text[:_MAX_ERROR_LENGTH]


class OutcomeRecorder:
    """Collects the outcomes of the cron jobs one pool runs and writes them in batches."""

    def __init__(
        self,
        *,
        connect: Callable[[], AbstractContextManager[psycopg.Connection[Any]]],
        queries: Queries,
    ) -> None:
        self._connect = connect
        self._queries = queries
        self._started: dict[int, float] = {}
        self._pending: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the flushing thread."""
        self._thread = threading.Thread(
            target=self._run, name="kongtask-cron-outcomes", daemon=True
        )
        self._thread.start()

    def part(self) -> Part:
        """The flushing thread as a part (``cron:outcomes``): healthy while it runs."""
        thread = self._thread
        return ThreadsPart("cron:outcomes", lambda: [("flush", thread)] if thread else [])

    def stop(self) -> None:
        """Write what is pending and stop the thread."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10.0)
        self.flush()

    # --- called by the executors, for cron jobs only (cheap) -------------------------

    def started(self, job: Any) -> None:
        """A cron job's handler is about to run."""
        with self._lock:
            self._started[job.id] = time.monotonic()

    def finished(self, job: Any, error: Any, *, permanent: bool) -> None:
        """A cron job's attempt ended: ``error`` None for success; ``permanent`` when no
        attempt is left."""
        outcome = "success" if error is None else "permanent_failure" if permanent else "failure"
        with self._lock:
            started = self._started.pop(job.id, None)
            self._pending[job.id] = {
                "job_id": job.id,
                "outcome": outcome,
                "finished_at": datetime.now(UTC).isoformat(),
                "duration_s": None if started is None else time.monotonic() - started,
                "attempts": job.attempts,
                "error": _clean(error),
            }

    # --- writing ---------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(_FLUSH_INTERVAL_S)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        """Write the pending outcomes now (kept for the next flush if that fails)."""
        with self._lock:
            batch, self._pending = self._pending, {}
        if not batch:
            return
        try:
            with self._connect() as conn:
                conn.execute(
                    self._queries.cron_record_outcomes,
                    {"outcomes": json.dumps(list(batch.values()))},
                )
        except Exception as exc:
            logger.warning("Could not record %d cron job outcome(s): %s", len(batch), exc)
            with self._lock:
                for job_id, row in batch.items():
                    self._pending.setdefault(job_id, row)
