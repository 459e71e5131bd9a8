"""Record the outcomes of cron jobs that this process's worker ran, from its job events.

The executor is not involved: the recorder listens to ``job:start``,
``job:complete`` (success or a failed attempt) and ``job:failed`` (no attempts
left) for one Runner, three events a job where four would do, keeps only jobs
whose payload carries ``_cron``, and writes their outcomes into
``_kongtask_cron_history`` in batches (one statement per flush) from a thread of
its own, so a slow database never holds up the event publisher. A job scheduled
by a Node worker has no history row; its update simply matches nothing.
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

from kongtask import events
from kongtask.sql import Queries

__all__ = ["OutcomeRecorder"]

logger = logging.getLogger("kongtask.cron")

_FLUSH_INTERVAL_S = 1.0
_MAX_ERROR_LENGTH = 2000


def _is_cron_job(job: Any) -> bool:
    payload = getattr(job, "payload", None)
    return isinstance(payload, dict) and isinstance(payload.get("_cron"), dict)


def _clean(error: Any) -> str | None:
    if error is None:
        return None
    text = str(error).replace("\x00", "\\u0000")
    text = text.encode("utf-8", "replace").decode("utf-8")
    return text[:_MAX_ERROR_LENGTH]


class OutcomeRecorder:
    """Connects to one sender's job events and records cron job outcomes."""

    def __init__(
        self,
        *,
        sender: Any,
        connect: Callable[[], AbstractContextManager[psycopg.Connection[Any]]],
        queries: Queries,
    ) -> None:
        self._sender = sender
        self._connect = connect
        self._queries = queries
        self._started: dict[int, float] = {}
        self._pending: dict[int, dict[str, Any]] = {}
        self._final: set[int] = set()  # permanently failed, awaiting their job:complete
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Connect the receivers and start the flushing thread."""
        for signal, receiver in self._receivers():
            signal.connect(receiver, sender=self._sender, weak=False)
        self._thread = threading.Thread(
            target=self._run, name="kongtask-cron-outcomes", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Disconnect, write what is pending, and stop the thread."""
        for signal, receiver in self._receivers():
            signal.disconnect(receiver, sender=self._sender)
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10.0)
        self.flush()

    def _receivers(self) -> list[tuple[Any, Callable[..., None]]]:
        return [
            (events.job_start, self._on_start),
            (events.job_complete, self._on_complete),
            (events.job_failed, self._on_failed),
        ]

    # --- receivers (on the event publisher's thread: cheap) ----------------------

    def _on_start(self, _sender: Any, *, job: Any, **_: Any) -> None:
        if _is_cron_job(job):
            with self._lock:
                self._started[job.id] = time.monotonic()

    def _finish(self, job: Any, outcome: str, error: Any) -> None:
        with self._lock:
            if outcome == "failure" and job.id in self._final:
                self._final.discard(job.id)  # job:complete follows job:failed: that stands
                return
            if outcome == "permanent_failure":
                self._final.add(job.id)
            started = self._started.pop(job.id, None)
            self._pending[job.id] = {
                "job_id": job.id,
                "outcome": outcome,
                "finished_at": datetime.now(UTC).isoformat(),
                "duration_s": None if started is None else time.monotonic() - started,
                "attempts": job.attempts,
                "error": _clean(error),
            }

    def _on_complete(self, _sender: Any, *, job: Any, error: Any = None, **_: Any) -> None:
        if _is_cron_job(job):
            self._finish(job, "success" if error is None else "failure", error)

    def _on_failed(self, _sender: Any, *, job: Any, error: Any = None, **_: Any) -> None:
        if _is_cron_job(job):
            self._finish(job, "permanent_failure", error)

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
                    self._queries.cron["CRON_RECORD_OUTCOMES"],
                    {"outcomes": json.dumps(list(batch.values()))},
                )
        except Exception as exc:
            logger.warning("Could not record %d cron job outcome(s): %s", len(batch), exc)
            with self._lock:
                for job_id, row in batch.items():
                    self._pending.setdefault(job_id, row)
