"""The executor pool: ``concurrency`` threads ("workers") that run task handlers.

Each worker pulls the next job straight from the shared local queue, so a
job costs no actor message; a worker with a quick handler runs job after job
without a thread switch. Outcomes go to the completer's outbox, with the
handler's run time (whoever needs to know more, like kongtask's cron
history, observes the completer's written batches). A handler
that raises fails only its own job; a list payload whose handler returns a
list of the same length fails only the items that are exceptions (batch
jobs, as in graphile-worker).
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from kongtask import events
from kongtask.helpers import Helpers
from kongtask.job import Job
from kongtask.jobs.context import WorkerContext, new_worker_id
from kongtask.jobs.last_error import last_error_text
from kongtask.jobs.outbox import Outbox

__all__ = ["ExecutorPool"]

logger = logging.getLogger("kongtask.worker")


class ExecutorPool:
    """Starts the worker threads and knows which job each one is running."""

    def __init__(
        self,
        ctx: WorkerContext,
        outbox: Outbox,
        on_all_stopped: Callable[[], None],
        confirm: Callable[[Job, str], bool],
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
        for thread in self._threads:
            thread.start()

    def release(self) -> None:
        """Ask every worker to stop once the local queue is empty (``worker:release``)."""
        for worker_id in self.worker_ids:
            self._ctx.bus.emit(events.worker_release, worker_id=worker_id)
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
        jobs = []
        for helpers in self.running():
            self._abandoned.add(id(helpers))
            helpers.request_abort()
            jobs.append(helpers.job)
        return jobs

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
        try:
            while True:
                item = take()
                if item is None:
                    break
                job, known_at = item
                reason = doubt(known_at)
                if reason is not None and not confirm(job, reason):
                    continue  # another pool holds it now
                self._run(index, worker_id, job)
        except BaseException as exc:
            error = exc
            logger.exception("Worker %s crashed", worker_id)
            self._ctx.bus.emit(events.worker_fatal_error, worker_id=worker_id, error=exc)
            self._ctx.fatal("worker", exc)
        finally:
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

    def _run(self, index: int, worker_id: str, job: Job) -> None:
        ctx = self._ctx
        bus = ctx.bus
        helpers = Helpers(ctx, job, worker_id)
        self._running[index] = helpers
        bus.emit(events.job_start, worker_id=worker_id, job=job)
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
        duration_s = time.perf_counter() - started
        self._running[index] = None
        if self._abandoned and id(helpers) in self._abandoned:
            # Discarded now: the id of a Helpers that ended may be reused by a later one.
            self._abandoned.discard(id(helpers))
            logger.warning(
                "Task %s (%s) finished after a shutdown failed it back; ignoring the outcome",
                job.id,
                job.task_identifier,
            )
            return
        if error is None:
            self._outbox.success(job, duration_s)
            bus.emit(events.job_success, worker_id=worker_id, job=job)
            if not ctx.no_log_success and logger.isEnabledFor(logging.INFO):
                attempt = (
                    f", attempt {job.attempts} of {job.max_attempts}" if job.attempts > 1 else ""
                )
                logger.info(
                    "Completed task %s (%s, %.2fms%s) with success",
                    job.id,
                    job.task_identifier,
                    duration_s * 1000.0,
                    attempt,
                )
        else:
            message = error_message(error)
            self._outbox.failure(job, message, replacement, duration_s)
            bus.emit(
                events.job_error,
                worker_id=worker_id,
                job=job,
                error=error,
                batch_job_errors=batch_errors,
            )
            if job.attempts >= job.max_attempts:
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
                duration_s * 1000.0,
                job.attempts,
                job.max_attempts,
                message,
                stack.replace("\n", "\n  "),
            )
        bus.emit(events.job_complete, worker_id=worker_id, job=job, error=error)


class _BatchError(Exception):
    """Some items of a batch job failed; the message lists them."""

    def __init__(self, errors: list[BaseException]) -> None:
        super().__init__("Batch failures:\n" + "\n".join(error_message(error) for error in errors))
        self.errors = errors


def error_message(error: BaseException) -> str:
    """The text stored as ``last_error``: the message, else the exception's name (sanitised)."""
    return last_error_text(error)
