"""The completer: records job outcomes in batched statements.

Executors drop outcomes into an :class:`Outbox` from their own threads; the
completer actor is woken by one message when the outbox goes from empty to
busy, and then flushes whatever has piled up, statement after statement,
until it is empty. Outcomes collect while a statement is in flight, so the
batch size adapts to load with no fixed delay. Successes become one
``complete_jobs`` statement, failures one ``fail_jobs`` statement; a
statement refused for its data is written again job by job, so one job's
outcome never costs the others theirs (see ``_complete_all``). After each
batch the completer tells the claimer ``Finished(n, released)``; it decides
nothing about claiming. Then the run's outcome observer, if any, sees the
batch (kongtask's cron history is recorded that way, off the executors' path).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import psycopg
import pykka

from kongtask.job import Job
from kongtask.jobs.context import WorkerContext
from kongtask.jobs.db_actor import DbActor
from kongtask.jobs.fetch_policy import Finished
from kongtask.jobs.last_error import sanitize_last_error
from kongtask.jobs.outbox import Outbox, OutcomeObserver, Outcomes
from kongtask.jobs.slow_statement import SLOW_STATEMENT_S, SlowStatement

__all__ = ["FLUSH", "Completer", "Flush"]

logger = logging.getLogger(__name__)


class Flush(NamedTuple):
    """Write every outcome in the outbox (an ``ask`` returns once it is empty)."""


FLUSH = Flush()

_T = TypeVar("_T")
#: An outcome waiting in the outbox: the job, its message, its retry payload,
#: whether it fails for good.
_Failure = tuple[Job, str, Any, bool]


class Completer(DbActor):
    """Owns the completion connection; message: flush (ask it to wait for a flush)."""

    action = "completeJob"
    max_attempts = 20

    def __init__(self, ctx: WorkerContext, outbox: Outbox, claimer: pykka.ActorRef[Any]) -> None:
        super().__init__(ctx)
        self._outbox = outbox
        # Told Finished and SlowStatement. Typed Any: importing the claimer
        # here would make the claimer and the completer import each other.
        self._claimer = claimer
        # The batch being written holds successful limited jobs (see _flush).
        self._announcing = False

    def handle(self, message: Flush) -> Any:
        match message:
            case Flush():
                self._flush()
                return True
        return None

    def _flush(self) -> None:
        while True:
            taken = self._outbox.take()
            successes, failures = taken.successes, taken.failures
            if not successes and not failures:
                return
            retried = False
            # Finished limited jobs free room another pool may be waiting for: the
            # completion says so itself; failures alone take a statement of their own.
            self._announcing = self._limited(successes)
            if successes:
                started = time.perf_counter()
                retried = self._complete_all(successes)
                seconds = time.perf_counter() - started
                if seconds >= SLOW_STATEMENT_S and not retried:
                    self._claimer.tell(SlowStatement(seconds))
            if failures:
                retried = self._fail_all(failures) or retried
            self.ctx.stats.record(taken)  # written: counted for the heartbeat's statistics
            queue_ids = [job.job_queue_id for job in successes if job.job_queue_id is not None]
            queue_ids += [job.job_queue_id for job, *_ in failures if job.job_queue_id is not None]
            released = bool(queue_ids)
            if retried and queue_ids:
                # A try that committed before its connection broke makes the
                # retry find nothing, so it would not release the queues.
                self.run(functools.partial(self._release, queue_ids=queue_ids), "Releasing queues")
            # A released named queue may hold the next runnable job, which a
            # short claim had to skip: the claimer's policy decides what to do.
            # With the handlers' run times: the claimer sizes its claims from them.
            run_s, timed = run_time(taken)
            self._claimer.tell(Finished(len(successes) + len(failures), released, run_s, timed))
            if not self._announcing and self._limited([job for job, *_ in failures]):
                self._announce_release()
            observer = self.ctx.outcome_observer
            if observer is not None:
                self._observe(observer, taken)

    def _limited(self, jobs: list[Job]) -> bool:
        """Whether any of ``jobs`` falls under a fleet-wide limit (its slot is free now)."""
        limits = self.ctx.limits
        if not limits.limited:
            return False
        # A job's queue name is not at hand: with queue limits, any queued job may count.
        queued = bool(limits.keys("queue"))
        return any(
            limits.job_keys(job.task_identifier, None, job.flags)
            or (queued and job.job_queue_id is not None)
            for job in jobs
        )

    def _announce_release(self) -> None:
        """Tell every pool that a limited job finished, so one with free slots claims now
        (only when some limit has jobs waiting for room)."""
        params = {"schema": self.ctx.settings.schema}
        try:
            self.run(
                lambda conn: conn.execute(self.ctx.queries.notify_released, params),
                "Announcing finished limited jobs",
            )
        except psycopg.Error as exc:
            # The pools' periodic check still finds the room, a few seconds later.
            logger.warning("Could not announce finished limited jobs: %s", exc)

    @staticmethod
    def _observe(observer: OutcomeObserver, taken: Outcomes) -> None:
        """Show a written batch to the run's observer; its failure costs only it."""
        try:
            observer.observe(taken)
        except Exception:
            count = len(taken.successes) + len(taken.failures)
            logger.exception("The outcome observer failed on a batch of %d outcome(s)", count)

    # --- statements the database refuses for their data -------------------------
    #
    # One job's outcome must never cost the batch: when a batched statement is
    # refused for a reason about the data (not the connection), the batch is
    # written again job by job, and a job whose own outcome is still refused
    # gets a plain message, or in the end is permanently failed, so that no job
    # is ever left locked and the completer goes on.

    def _complete_all(self, jobs: list[Job]) -> bool:
        """Complete ``jobs``; True when queues may need an explicit release."""

        def complete(batch: list[Job]) -> bool:
            complete_ids = functools.partial(self._complete, ids=[job.id for job in batch])
            return self.run_noting_retries(complete_ids, _COMPLETING).retried

        def remedy(job: Job, refused: BaseException) -> None:
            # Its row cannot be deleted (a foreign key or trigger of the
            # application's): keep it from running again, and say why.
            self._give_up(
                job,
                "the job succeeded, but the database refused to delete its row "
                f"({_describe(refused)}); kongtask failed it permanently so that it does "
                "not run again",
            )

        return self._write_each(jobs, complete, remedy, "Completing")

    def _fail_all(self, failures: list[_Failure]) -> bool:
        """Fail ``failures``; True when queues may need an explicit release."""

        def fail(batch: list[_Failure]) -> bool:
            specs = json.dumps([_fail_spec(*failure) for failure in batch])
            fail_specs = functools.partial(self._fail, specs=specs)
            return self.run_noting_retries(fail_specs, "Failing jobs").retried

        def remedy(failure: _Failure, refused: BaseException) -> None:
            job, permanent = failure[0], failure[3]
            plain = (
                f"the database refused to record this job's error ({_describe(refused)}); "
                "kongtask replaced it with this message"
            )
            logger.error("Recording the failure of job %s was refused: %s", job.id, plain)
            # A plain message, and the payload left as it is.
            again = self._refusal(lambda: fail([(job, plain, None, permanent)]))
            if again is not None:
                self._give_up(
                    job,
                    "the database refused every attempt to record this job's failure "
                    f"({_describe(again)}); kongtask failed it permanently",
                )

        return self._write_each(failures, fail, remedy, "Failing")

    def _write_each(
        self,
        items: list[_T],
        write: Callable[[list[_T]], bool],
        remedy: Callable[[_T, BaseException], None],
        what: str,
    ) -> bool:
        """``write(items)`` in one statement, else item by item, ``remedy`` for refused ones.

        ``write`` returns whether its statement needed a retry. Returns True when
        a queue may need an explicit release (a retry or a fallback happened).
        """
        retried = False

        def write_all() -> None:
            nonlocal retried
            retried = write(items)

        refused = self._refusal(write_all)
        if refused is None:
            return retried
        if len(items) == 1:
            remedy(items[0], refused)
            return True
        logger.error(
            "%s %d jobs in one statement was refused (%s); writing them one by one",
            what,
            len(items),
            _describe(refused),
        )
        for item in items:
            alone = self._refusal(functools.partial(write, [item]))
            if alone is not None:
                remedy(item, alone)
        return True

    @staticmethod
    def _refusal(write: Callable[[], object]) -> BaseException | None:
        """Run ``write``; return the exception if the database refused its data, else None.

        Any other exception (a lost connection that retries could not cure, a
        bug) propagates and is fatal, as before.
        """
        try:
            write()
        except Exception as exc:
            if not _refused_for_its_data(exc):
                raise
            return exc
        return None

    def _give_up(self, job: Job, message: str) -> None:
        """Permanently fail ``job`` (unlocking it and its queue) with ``message``."""
        logger.error("Permanently failing job %s: %s", job.id, message)
        params = {"id": job.id, "message": sanitize_last_error(message)}
        refused = self._refusal(
            lambda: self.run(
                functools.partial(self._permanently_fail, params=params), "Failing a job"
            )
        )
        if refused is not None:
            # Nothing else can be written for it; the stale-lock sweep will free it.
            logger.critical(
                "The database refused to fail job %s in any way (%s); it stays locked by %s "
                "until the stale-lock sweep",
                job.id,
                _describe(refused),
                self.ctx.pool_id,
            )

    def _permanently_fail(self, conn: psycopg.Connection[Any], params: dict[str, Any]) -> None:
        conn.execute(
            self.ctx.queries.permanently_fail_held_job, {**params, "pool_id": self.ctx.pool_id}
        )

    def _complete(self, conn: psycopg.Connection[Any], ids: list[int]) -> None:
        params = {"ids": ids, "pool_id": self.ctx.pool_id}
        if self._announcing:
            params["schema"] = self.ctx.settings.schema
            conn.execute(self.ctx.queries.complete_jobs_announcing, params)
        else:
            conn.execute(self.ctx.queries.complete_jobs, params)

    def _release(self, conn: psycopg.Connection[Any], queue_ids: list[int]) -> None:
        params = {"queue_ids": queue_ids, "pool_id": self.ctx.pool_id}
        conn.execute(self.ctx.queries.release_queues, params)

    def _fail(self, conn: psycopg.Connection[Any], specs: str) -> None:
        conn.execute(self.ctx.queries.fail_jobs, {"specs": specs, "pool_id": self.ctx.pool_id})


_COMPLETING = "Completing jobs"

# SQLSTATE classes meaning "this statement's data is refused": data exception,
# integrity constraint violation, program limit exceeded.
_DATA_SQLSTATE_CLASSES = frozenset({"22", "23", "54"})


def _refused_for_its_data(exc: BaseException) -> bool:
    """True when ``exc`` is about the values written, not the connection or a bug.

    Besides the SQLSTATE classes above that covers an exception raised by a
    trigger (P0001) and the client refusing to encode a parameter (a NUL, a
    lone surrogate, a value JSON cannot carry).
    """
    if isinstance(exc, psycopg.Error):
        state = exc.sqlstate
        if state is None:
            return isinstance(exc, psycopg.DataError)
        return state[:2] in _DATA_SQLSTATE_CLASSES or state == "P0001"
    return isinstance(exc, ValueError | TypeError | RecursionError)


def _describe(exc: BaseException) -> str:
    """A short, safe description of a refusal: SQLSTATE or type, and the first line."""
    state = getattr(exc, "sqlstate", None)
    first = sanitize_last_error(str(exc).strip().split("\n", 1)[0])[:300]
    return f"{state or type(exc).__name__}: {first}" if first else (state or type(exc).__name__)


def _fail_spec(job: Job, message: str, payload: Any, permanent: bool) -> dict[str, Any]:
    # A JSON null would replace the payload with null: leave the key out instead.
    spec: dict[str, Any] = {"id": job.id, "message": sanitize_last_error(message)}
    if payload is not None:
        spec["payload"] = payload
    if permanent:
        spec["permanent"] = True
    return spec


def run_time(outcomes: Outcomes) -> tuple[float, int]:
    """The handlers' total run time in a batch of outcomes, and how many runs it counts
    (outcomes without a run time, of jobs no handler ran, are left out)."""
    timed = [
        duration
        for durations in (outcomes.success_durations, outcomes.failure_durations)
        for duration in durations
        if duration is not None
    ]
    return sum(timed), len(timed)
