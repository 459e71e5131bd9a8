"""Record the outcomes of cron jobs that this process's worker ran.

The recorder observes the batches of outcomes the worker's completer has
written (see :class:`kongtask.jobs.outbox.OutcomeObserver`: the Runner hands
it to the job service), keeps those of cron jobs (their payload carries
``_cron``) and writes them into ``_kongtask_cron_history`` in batches (one
statement per flush) from a thread of its own, so a slow database never
holds up the completer. The executors know nothing of it: a job costs them no
event and no check for the history. A failure's error is the job's
``last_error`` text exactly (the executor already passed it through
``sanitize_last_error``). The finish time comes from the run's clock; the
duration is the handler's run time the executor measured. A job scheduled by
a Node worker has no history row; its update simply matches nothing.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import psycopg

from kongtask.db.statements import Queries
from kongtask.protocols import Clock
from kongtask.runtime.parts import Part, ThreadsPart

if TYPE_CHECKING:
    from kongtask.jobs.outbox import Outcomes

__all__ = ["OutcomeRecorder", "is_cron_job"]

logger = logging.getLogger("kongtask.cron")

_FLUSH_INTERVAL_S = 1.0


def is_cron_job(job: Any) -> bool:
    """Whether ``job`` was scheduled by a cron node (its payload carries ``_cron``)."""
    payload = getattr(job, "payload", None)
    return type(payload) is dict and isinstance(payload.get("_cron"), dict)


class OutcomeRecorder:
    """Collects the outcomes of the cron jobs one pool runs and writes them in batches."""

    def __init__(
        self,
        *,
        connect: Callable[[], AbstractContextManager[psycopg.Connection[Any]]],
        queries: Queries,
        clock: Clock,
    ) -> None:
        self._connect = connect
        self._queries = queries
        self._clock = clock
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

    # --- called by the completer, once per written batch ------------------------------

    def observe(self, outcomes: Outcomes) -> None:
        """Keep the outcomes of the cron jobs in a batch the completer has written."""
        rows: list[dict[str, Any]] = []
        finished_at = ""
        for job, duration in zip(outcomes.successes, outcomes.success_durations, strict=True):
            if is_cron_job(job):
                finished_at = finished_at or self._clock.now().isoformat()
                rows.append(_row(job, "success", finished_at, duration, None))
        for failure, duration in zip(outcomes.failures, outcomes.failure_durations, strict=True):
            job, message = failure[0], failure[1]
            if is_cron_job(job):
                finished_at = finished_at or self._clock.now().isoformat()
                permanent = job.attempts >= job.max_attempts
                outcome = "permanent_failure" if permanent else "failure"
                rows.append(_row(job, outcome, finished_at, duration, message))
        if rows:
            with self._lock:
                self._pending.update((row["job_id"], row) for row in rows)

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


def _row(
    job: Any, outcome: str, finished_at: str, duration_s: float | None, error: str | None
) -> dict[str, Any]:
    """One history update, in the shape ``cron_record_outcomes`` reads."""
    return {
        "job_id": job.id,
        "outcome": outcome,
        "finished_at": finished_at,
        "duration_s": duration_s,
        "attempts": job.attempts,
        "error": error,
    }
