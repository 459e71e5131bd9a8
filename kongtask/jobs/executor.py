"""The executor pool: ``concurrency`` threads ("workers") that run task handlers.

Each worker pulls the next job straight from the shared local queue, so a
job costs no actor message; a worker with a quick handler runs job after job
without a thread switch. Outcomes go to the completer's outbox. A handler
that raises fails only its own job; a list payload whose handler returns a
list of the same length fails only the items that are exceptions (batch
jobs, as in graphile-worker).

A task with a timeout (its own ``timeout_s`` or the worker's) runs under the
:class:`~kongtask.jobs.watchdog.Watchdog`: past the deadline the job's abort
event is set, the attempt is failed (``timed out after N s``) and a new
thread takes the slot, so a handler that ignores the abort event holds a
thread but not the slot. That thread is counted as stuck until its handler
returns; its late result is ignored. A cancel (``kongtask:cancel``) of a job
the pool holds sets its abort event and fails it for good when it ends.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

from kongtask import events
from kongtask.cron.service.outcomes import OutcomeRecorder, is_cron_job
from kongtask.errors import JobCancelledError, JobTimeoutError
from kongtask.helpers import Helpers
from kongtask.job import Job
from kongtask.jobs.context import WorkerContext, new_worker_id
from kongtask.jobs.last_error import last_error_text
from kongtask.jobs.outbox import Outbox
from kongtask.jobs.watchdog import TimedRun, Watchdog

__all__ = ["ExecutorPool"]

logger = logging.getLogger("kongtask.worker")

#: Cancels remembered for jobs not running here yet (buffered, or about to start).
_MAX_CANCEL_REQUESTS = 1000


class ExecutorPool:
    """Starts the worker threads and knows which job each one is running."""

    def __init__(
        self,
        ctx: WorkerContext,
        outbox: Outbox,
        on_all_stopped: Callable[[], None],
        confirm: Callable[[Job, str], bool],
        timeouts: Mapping[str, float] | None = None,
    ) -> None:
        self._ctx = ctx
        self._outbox = outbox
        self._on_all_stopped = on_all_stopped
        #: Asked (job, reason) before starting a job the pool may no longer hold.
        self._confirm = confirm
        count = ctx.settings.concurrency
        self.worker_ids = [new_worker_id() for _ in range(count)]
        self._running: list[Helpers | None] = [None] * count
        # The runs a shutdown failed back: their outcome is ignored when they end.
        self._abandoned: set[int] = set()
        self._threads: list[threading.Thread] = []
        self._stopped = threading.Condition()
        self._alive = 0
        self._reported: set[int] = set()
        self._released = False
        #: Task identifier -> timeout in seconds; empty when no task has one.
        self._timeouts = dict(timeouts or {})
        self._watchdog: Watchdog | None = None
        if self._timeouts:
            self._watchdog = Watchdog(
                count,
                min(self._timeouts.values()),
                self._expired,
                name=f"kongtask-watchdog-{ctx.pool_id}",
            )
        #: Threads whose handler outlived its timeout and has not returned yet.
        self._stuck = 0
        #: Job id -> the last_error to fail it with for good (cancels heard of).
        self._cancels: dict[int, str] = {}

    def start(self) -> None:
        """Start every worker thread (emitting ``worker:create`` for each)."""
        tasks = sorted(self._ctx.tasks)
        for index, worker_id in enumerate(self.worker_ids):
            self._ctx.bus.emit(events.worker_create, worker_id=worker_id, tasks=tasks)
            thread = threading.Thread(
                target=self._work,
                args=(index, worker_id),
                name=f"kongtask-{worker_id}",
                daemon=True,
            )
            self._threads.append(thread)
        with self._stopped:
            self._alive = len(self._threads)
        if self._watchdog is not None:
            self._watchdog.start()
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        """Stop the watchdog (if any); threads still running are left to end on their own."""
        if self._watchdog is not None:
            self._watchdog.stop()

    @property
    def stuck_threads(self) -> int:
        """Executor threads whose handler ran past its timeout and has not returned yet."""
        return self._stuck

    def cancel(self, job_id: int, message: str) -> bool:
        """Cancel ``job_id`` held by this pool: True if it is running here now (its abort
        event is set); it fails for good with ``message`` when it ends, or never starts."""
        target = None
        with self._stopped:
            cancels = self._cancels
            cancels[job_id] = message
            while len(cancels) > _MAX_CANCEL_REQUESTS:
                try:
                    del cancels[next(iter(cancels))]
                except (StopIteration, RuntimeError, KeyError):
                    break
            for helpers in self._running:
                if helpers is not None and helpers.job.id == job_id:
                    target = helpers
                    break
        if target is None:
            return False
        target.request_abort()
        return True

    def release(self) -> None:
        """Ask every worker to stop once the local queue is empty (``worker:release``)."""
        for worker_id in self.worker_ids:
            self._ctx.bus.emit(events.worker_release, worker_id=worker_id)
        with self._stopped:
            self._released = True
        self._ctx.queue.close()

    def all_stopped(self) -> bool:
        """True once every worker thread has finished."""
        with self._stopped:
            return self._alive == 0

    def still_running_ids(self) -> list[str]:
        """Workers whose thread is still busy; they count as stopped from now on."""
        with self._stopped:
            ids = [
                self.worker_ids[index]
                for index, thread in enumerate(self._threads)
                if thread.is_alive() and index not in self._reported
            ]
            self._reported.update(
                index for index, thread in enumerate(self._threads) if thread.is_alive()
            )
        return ids

    def threads(self) -> list[tuple[str, threading.Thread]]:
        """Each worker id with its thread (for the health probe)."""
        return list(zip(self.worker_ids, self._threads, strict=False))

    def running(self) -> list[Helpers]:
        """The helpers of every job running right now."""
        return [helpers for helpers in self._running if helpers is not None]

    def abandon_running(self) -> list[Job]:
        """Set each running job's abort event and disown it; returns those jobs.

        The caller fails them back; when their handlers return eventually,
        the outcome is ignored (the job may already be running elsewhere).
        """
        with self._stopped:
            running = self.running()
            for helpers in running:
                self._abandoned.add(id(helpers))
        for helpers in running:
            helpers.request_abort()
        return [helpers.job for helpers in running]

    def signal_abort(self) -> None:
        """Set the abort event of every running job (the graceful timeout passed)."""
        for helpers in self.running():
            helpers.request_abort()

    # --- a worker thread ----------------------------------------------------------

    def _work(self, index: int, worker_id: str) -> None:
        error: BaseException | None = None
        take = self._ctx.queue.take
        doubt = self._ctx.ownership.doubt
        confirm = self._confirm
        cancels = self._cancels
        replaced = False
        try:
            while True:
                item = take()
                if item is None:
                    break
                job, known_at = item
                reason = doubt(known_at)
                if reason is not None and not confirm(job, reason):
                    continue  # another pool holds it now
                if cancels and job.id in cancels:
                    self._fail_unstarted(worker_id, job, cancels.pop(job.id, "cancelled"))
                    continue
                if not self._run(index, worker_id, job):
                    replaced = True  # it timed out: another thread has the slot now
                    break
        except BaseException as exc:
            error = exc
            logger.exception("Worker %s crashed", worker_id)
            self._ctx.bus.emit(events.worker_fatal_error, worker_id=worker_id, error=exc)
            self._ctx.fatal("worker", exc)
        finally:
            if replaced:
                # The slot's accounting moved to the thread that took it over.
                with self._stopped:
                    self._stuck -= 1
                self._ctx.bus.emit(events.worker_stop, worker_id=worker_id, error=None)
            else:
                self._leave_slot(index, worker_id, error)

    def _leave_slot(self, index: int, worker_id: str, error: BaseException | None) -> None:
        """A slot's thread ends: ``worker:stop`` (once) and the last one says all stopped."""
        with self._stopped:
            reported = index in self._reported
            self._reported.add(index)
        if not reported:
            self._ctx.bus.emit(events.worker_stop, worker_id=worker_id, error=error)
        with self._stopped:
            self._alive -= 1
            last = self._alive == 0
            self._stopped.notify_all()
        if last:
            self._on_all_stopped()

    def _run(self, index: int, worker_id: str, job: Job) -> bool:
        """Run one job; False when it timed out and this thread must leave its slot."""
        ctx = self._ctx
        bus = ctx.bus
        helpers = Helpers(ctx, job, worker_id)
        self._running[index] = helpers
        bus.emit(events.job_start, worker_id=worker_id, job=job)
        outcomes = ctx.cron_outcomes
        if outcomes is not None and not is_cron_job(job):
            outcomes = None
        if outcomes is not None:
            outcomes.started(job)
        timed: TimedRun | None = None
        if self._timeouts:
            timeout_s = self._timeouts.get(job.task_identifier)
            if timeout_s is not None:
                assert self._watchdog is not None
                timed = TimedRun(
                    index, timeout_s, helpers.request_abort, (worker_id, helpers, outcomes)
                )
                self._watchdog.watch(timed)
        handler = ctx.tasks.get(job.task_identifier)
        error: BaseException | None = None
        batch_errors: list[BaseException] | None = None
        replacement: list[Any] | None = None
        started = time.perf_counter()
        try:
            if handler is None:
                raise LookupError(f"Unsupported task '{job.task_identifier}'")
            result = handler(job.payload, helpers)
            payload = job.payload
            if type(payload) is list and type(result) is list:
                if len(result) == len(payload):
                    failed = [i for i, item in enumerate(result) if isinstance(item, BaseException)]
                    if failed:
                        batch_errors = [result[i] for i in failed]
                        replacement = [payload[i] for i in failed]
                        error = _BatchError(batch_errors)
                else:
                    logger.warning(
                        "Task '%s' has invalid return value - should return a list with the "
                        "same length as the payload, %d, but returned %d items; treating as "
                        "success",
                        job.task_identifier,
                        len(payload),
                        len(result),
                    )
        except BaseException as exc:
            error = exc
        duration_ms = (time.perf_counter() - started) * 1000.0
        if timed is not None and not self._watchdog.finish(timed):  # type: ignore[union-attr]
            logger.warning(
                "Task %s (%s) returned after %.2fms, past its %g s timeout; its attempt was "
                "already failed, so this outcome is ignored",
                job.id,
                job.task_identifier,
                duration_ms,
                timed.timeout_s,
            )
            return False
        self._running[index] = None
        if self._abandoned and id(helpers) in self._abandoned:
            # Discarded now: the id of a Helpers that ended may be reused by a later one.
            self._abandoned.discard(id(helpers))
            logger.warning(
                "Task %s (%s) finished after a shutdown failed it back; ignoring the outcome",
                job.id,
                job.task_identifier,
            )
            return True
        if self._cancels:
            cancelled = self._cancels.pop(job.id, None)
            if cancelled is not None:
                self._record_failure(
                    worker_id,
                    job,
                    JobCancelledError(cancelled.partition(": ")[2] or None),
                    duration_ms,
                    outcomes,
                    permanent=True,
                )
                return True
        if error is None:
            self._outbox.success(job)
            bus.emit(events.job_success, worker_id=worker_id, job=job)
            if not ctx.no_log_success and logger.isEnabledFor(logging.INFO):
                attempt = (
                    f", attempt {job.attempts} of {job.max_attempts}" if job.attempts > 1 else ""
                )
                logger.info(
                    "Completed task %s (%s, %.2fms%s) with success",
                    job.id,
                    job.task_identifier,
                    duration_ms,
                    attempt,
                )
        else:
            self._record_failure(
                worker_id, job, error, duration_ms, outcomes, batch_errors, replacement
            )
            return True
        bus.emit(events.job_complete, worker_id=worker_id, job=job, error=error)
        if outcomes is not None:
            outcomes.finished(job, None, permanent=False)
        return True

    def _record_failure(
        self,
        worker_id: str,
        job: Job,
        error: BaseException,
        duration_ms: float,
        outcomes: OutcomeRecorder | None,
        batch_errors: list[BaseException] | None = None,
        replacement: list[Any] | None = None,
        *,
        permanent: bool = False,
    ) -> None:
        """Send a failed attempt to the outbox, emit its events and log it."""
        bus = self._ctx.bus
        message = error_message(error)
        self._outbox.failure(job, message, replacement, permanent)
        bus.emit(
            events.job_error,
            worker_id=worker_id,
            job=job,
            error=error,
            batch_job_errors=batch_errors,
        )
        final = permanent or job.attempts >= job.max_attempts
        if final:
            bus.emit(
                events.job_failed,
                worker_id=worker_id,
                job=job,
                error=error,
                batch_job_errors=batch_errors,
            )
        stack = "".join(traceback.format_exception(error)).rstrip()
        logger.error(
            "Failed task %s (%s, %.2fms, attempt %d of %d) with error '%s':\n  %s",
            job.id,
            job.task_identifier,
            duration_ms,
            job.attempts,
            job.max_attempts,
            message,
            stack.replace("\n", "\n  "),
        )
        bus.emit(events.job_complete, worker_id=worker_id, job=job, error=error)
        if outcomes is not None:
            outcomes.finished(job, error, permanent=final)

    def _fail_unstarted(self, worker_id: str, job: Job, message: str) -> None:
        """A job cancelled while it waited in the local buffer: failed for good, never run."""
        logger.info("Task %s (%s) was cancelled before it started", job.id, job.task_identifier)
        self._record_failure(
            worker_id,
            job,
            JobCancelledError(message.partition(": ")[2] or None),
            0.0,
            None,
            permanent=True,
        )

    def _expired(self, run: TimedRun) -> None:
        """The watchdog's call for a run past its deadline (on the watchdog thread).

        Fails the attempt (for good if it was cancelled), asks the handler to
        stop, and hands the slot to a new thread; the old one is counted as
        stuck until its handler returns.
        """
        worker_id, helpers, outcomes = run.info
        job: Job = helpers.job
        index = run.index
        thread: threading.Thread | None = None
        last = False
        with self._stopped:
            if self._running[index] is helpers:
                self._running[index] = None
            abandoned = id(helpers) in self._abandoned
            self._abandoned.discard(id(helpers))
            self._stuck += 1
            if self._released:
                self._alive -= 1
                last = self._alive == 0
            else:
                new_id = new_worker_id()
                self.worker_ids[index] = new_id
                thread = threading.Thread(
                    target=self._work,
                    args=(index, new_id),
                    name=f"kongtask-{new_id}",
                    daemon=True,
                )
                self._threads[index] = thread
        run.abort()
        if not abandoned:
            cancelled = self._cancels.pop(job.id, None)
            error: BaseException = (
                JobTimeoutError(run.timeout_s)
                if cancelled is None
                else JobCancelledError(cancelled.partition(": ")[2] or None)
            )
            self._record_failure(
                worker_id,
                job,
                error,
                run.timeout_s * 1000.0,
                outcomes,
                permanent=cancelled is not None,
            )
        logger.warning(
            "Task %s (%s) ran past its %g s timeout and ignored its abort event so far; "
            "its thread is left to finish (stuck threads: %d)%s",
            job.id,
            job.task_identifier,
            run.timeout_s,
            self._stuck,
            "" if thread is None else f"; {thread.name} takes its slot",
        )
        if thread is not None:
            self._ctx.bus.emit(
                events.worker_create,
                worker_id=self.worker_ids[index],
                tasks=sorted(self._ctx.tasks),
            )
            thread.start()
        elif last:
            self._on_all_stopped()


class _BatchError(Exception):
    """Some items of a batch job failed; the message lists them."""

    def __init__(self, errors: list[BaseException]) -> None:
        super().__init__("Batch failures:\n" + "\n".join(error_message(error) for error in errors))
        self.errors = errors


def error_message(error: BaseException) -> str:
    """The text stored as ``last_error``: the message, else the exception's name (sanitised)."""
    return last_error_text(error)
