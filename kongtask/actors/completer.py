"""The completer: records job outcomes in batched statements.

Executors drop outcomes into an :class:`Outbox` from their own threads; the
completer actor is woken by one message when the outbox goes from empty to
busy, and then flushes whatever has piled up, statement after statement,
until it is empty. Outcomes collect while a statement is in flight, so the
batch size adapts to load with no fixed delay. Successes become one
``complete_jobs`` statement, failures one ``fail_jobs`` statement. After
each batch the completer tells the claimer ``Finished(n, released)``; it
decides nothing about claiming.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, NamedTuple

import psycopg
import pykka

from kongtask.job import Job

from .claimer import SLOW_STATEMENT_S, SlowStatement
from .context import WorkerContext
from .db_actor import DbActor
from .fetch_policy import Finished

if TYPE_CHECKING:
    from .claimer import Claimer

__all__ = ["FLUSH", "Completer", "Flush", "Outbox"]

logger = logging.getLogger(__name__)


class Flush(NamedTuple):
    """Write every outcome in the outbox (an ``ask`` returns once it is empty)."""


FLUSH = Flush()


class Outbox:
    """Outcomes waiting to be written; filled by executor threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.successes: list[Job] = []
        self.failures: list[tuple[Job, str, Any]] = []
        self._scheduled = False
        self.actor: pykka.ActorRef[Completer] | None = None

    def success(self, job: Job) -> None:
        """Record that ``job`` succeeded."""
        with self._lock:
            self.successes.append(job)
            if self._scheduled:
                return
            self._scheduled = True
        self._wake()

    def failure(self, job: Job, message: str, replacement_payload: Any = None) -> None:
        """Record that ``job`` failed with ``message`` (and, for batches, its retry payload)."""
        with self._lock:
            self.failures.append((job, message, replacement_payload))
            if self._scheduled:
                return
            self._scheduled = True
        self._wake()

    def _wake(self) -> None:
        actor = self.actor
        if actor is not None:
            actor.tell(FLUSH)

    def take(self) -> tuple[list[Job], list[tuple[Job, str, Any]]]:
        """Everything recorded so far; clears the scheduled flag when empty."""
        with self._lock:
            successes, failures = self.successes, self.failures
            if not successes and not failures:
                self._scheduled = False
            else:
                self.successes, self.failures = [], []
            return successes, failures


class Completer(DbActor):
    """Owns the completion connection; message: flush (ask it to wait for a flush)."""

    action = "completeJob"
    max_attempts = 20

    def __init__(
        self, ctx: WorkerContext, outbox: Outbox, claimer: pykka.ActorRef[Claimer]
    ) -> None:
        super().__init__(ctx)
        self._outbox = outbox
        self._claimer = claimer

    def handle(self, message: Any) -> Any:
        if isinstance(message, Flush):
            self._flush()
            return True
        return None

    def _flush(self) -> None:
        while True:
            successes, failures = self._outbox.take()
            if not successes and not failures:
                return
            retried = False
            if successes:
                ids = [job.id for job in successes]
                started = time.perf_counter()
                self.run(functools.partial(self._complete, ids=ids), "Completing jobs")
                retried = self.retried
                seconds = time.perf_counter() - started
                if seconds >= SLOW_STATEMENT_S and not retried:
                    self._claimer.tell(SlowStatement(seconds))
            if failures:
                specs = json.dumps([_fail_spec(*failure) for failure in failures])
                self.run(functools.partial(self._fail, specs=specs), "Failing jobs")
                retried = retried or self.retried
            queue_ids = [job.job_queue_id for job in successes if job.job_queue_id is not None]
            queue_ids += [
                job.job_queue_id for job, _, _ in failures if job.job_queue_id is not None
            ]
            released = bool(queue_ids)
            if retried and queue_ids:
                # A try that committed before its connection broke makes the
                # retry find nothing, so it would not release the queues.
                self.run(functools.partial(self._release, queue_ids=queue_ids), "Releasing queues")
            # A released named queue may hold the next runnable job, which a
            # short claim had to skip: the claimer's policy decides what to do.
            self._claimer.tell(Finished(len(successes) + len(failures), released))

    def _complete(self, conn: psycopg.Connection[Any], ids: list[int]) -> None:
        conn.execute(self.ctx.queries.complete_jobs, {"ids": ids, "pool_id": self.ctx.pool_id})

    def _release(self, conn: psycopg.Connection[Any], queue_ids: list[int]) -> None:
        params = {"queue_ids": queue_ids, "pool_id": self.ctx.pool_id}
        conn.execute(self.ctx.queries.release_queues, params)

    def _fail(self, conn: psycopg.Connection[Any], specs: str) -> None:
        conn.execute(self.ctx.queries.fail_jobs, {"specs": specs, "pool_id": self.ctx.pool_id})


def _fail_spec(job: Job, message: str, payload: Any) -> dict[str, Any]:
    # A JSON null would replace the payload with null: leave the key out instead.
    spec: dict[str, Any] = {"id": job.id, "message": message}
    if payload is not None:
        spec["payload"] = payload
    return spec
