"""The executor pool: ``concurrency`` threads ("workers") that run task handlers.

Each worker pulls the next job straight from the shared local queue, so a
job costs no actor message; a worker with a quick handler runs job after job
without a thread switch. Outcomes go to the completer's outbox, with the
handler's run time (whoever needs to know more, like kongtask's cron
history, observes the completer's written batches). A handler
that raises fails only its own job; a list payload whose handler returns a
list of the same length fails only the items that are exceptions (batch
jobs, as in graphile-worker). ``async def`` handlers run on the Runner's
event loop; their outcomes take the same path.

A task with a timeout (its own ``timeout_s`` or the worker's) runs under the
:class:`~kongtask.jobs.watchdog.Watchdog`: past the deadline the job's abort
event is set, the attempt is failed (``timed out after N s``) and a new
thread takes the slot, so a handler that ignores the abort event holds a
thread but not the slot. That thread is counted as stuck until its handler
returns; its late result is ignored. An async handler past its timeout is
cancelled instead. A cancel (``kongtask:cancel``) of a job the pool holds
sets its abort event and fails it for good when it ends.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from kongtask import events
from kongtask.errors import JobCancelledError, JobTimeoutError
from kongtask.helpers import AsyncHelpers, Helpers
from kongtask.job import Job
from kongtask.jobs.aio import AsyncJobs, is_async_handler
from kongtask.jobs.context import WorkerContext, new_worker_id
from kongtask.jobs.last_error import last_error_text
from kongtask.jobs.outbox import Outbox
from kongtask.jobs.watchdog import TimedRun, Watchdog

__all__ = ["ASYNC_TAKERS", "ExecutorPool"]

logger = logging.getLogger("kongtask.worker")

#: Threads taking jobs when every handler is ``async def``: they only hand jobs
#: to the event loop, so a couple suffice whatever the concurrency.
ASYNC_TAKERS = 2

#: Cancels remembered for jobs not running here yet (buffered, or about to start).
_MAX_CANCEL_REQUESTS = 1000


class ExecutorPool:
    """Starts the worker threads and knows which job each one is running.

    With only plain handlers there are ``concurrency`` threads, each running
    one job at a time. When the task map holds ``async def`` handlers, the
    jobs in flight are counted by a semaphore of ``concurrency`` slots
    instead: a thread that takes an async job hands it to the event loop and
    takes the next, and the slot is freed when the coroutine ends. Threads
    are then sized by what runs on them: :data:`ASYNC_TAKERS` to begin with,
    and one more (up to ``concurrency``) whenever every thread is inside a
    plain handler, so a mixed task map costs as many threads as plain jobs
    ever ran at once, plus one.
    """

    def __init__(
        self,
        ctx: WorkerContext,
        outbox: Outbox,
        on_all_stopped: Callable[[], None],
        confirm: Callable[[Job, str], bool],
        aio: AsyncJobs | None = None,
        timeouts: Mapping[str, float] | None = None,
    ) -> None:
        self._ctx = ctx
        self._outbox = outbox
        self._on_all_stopped = on_all_stopped
        #: Asked (job, reason) before starting a job the pool may no longer hold.
        self._confirm = confirm
        self._aio = aio
        concurrency = ctx.settings.concurrency
        #: Task identifiers whose handler is an ``async def`` (run on ``aio``'s loop).
        self._async_names = frozenset(
            name for name, handler in ctx.tasks.items() if is_async_handler(handler)
        )
        if self._async_names and aio is None:
            raise ValueError("async handlers need the Runner's event loop")
        count = concurrency
        self._slots: threading.Semaphore | None = None
        #: Threads are added up to this many (gated mode: while plain jobs occupy them all).
        self._max_threads = concurrency
        if self._async_names:
            self._slots = threading.Semaphore(concurrency)
            count = min(concurrency, ASYNC_TAKERS)
            if len(self._async_names) == len(ctx.tasks):
                self._max_threads = count
        # Gated mode: threads not inside a plain handler (free to take the next job).
        self._free_takers = count
        self.worker_ids = [new_worker_id() for _ in range(count)]
        self._running: list[Helpers | None] = [None] * self._max_threads
        # Async jobs in flight -> their task on the loop (None until it is made there).
        self._async_running: dict[AsyncHelpers, asyncio.Task[None] | None] = {}
        # The runs a shutdown failed back: their outcome is ignored when they end.
        self._abandoned: set[int] = set()
        # Async jobs handed to the loop, waiting for it to start them.
        self._handoff: deque[tuple[str, Job, AsyncHelpers, threading.Semaphore]] = deque()
        self._handoff_scheduled = False
        self._threads: list[threading.Thread] = []
        self._stopped = threading.Condition()
        self._alive = 0
        self._in_flight = 0
        self._reported: set[int] = set()
        self._released = False
        #: Task identifier -> timeout in seconds; empty when no task has one.
        self._timeouts = dict(timeouts or {})
        self._watchdog: Watchdog | None = None
        if self._timeouts:
            self._watchdog = Watchdog(
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
            for helpers in self.running():
                if helpers.job.id == job_id:
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
        """True once every worker thread has finished and no async job is in flight."""
        with self._stopped:
            return self._alive == 0 and self._in_flight == 0

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
        """The helpers of every job running right now (async ones included)."""
        running = [helpers for helpers in self._running if helpers is not None]
        if self._async_running:
            with self._stopped:
                running.extend(self._async_running)
        return running

    def abandon_running(self) -> list[Job]:
        """Set each running job's abort event and disown it; returns those jobs.

        The caller fails them back; when their handlers return eventually,
        the outcome is ignored (the job may already be running elsewhere).
        Async jobs are cancelled too (``CancelledError`` inside the handler).
        """
        with self._stopped:
            running = self.running()
            for helpers in running:
                self._abandoned.add(id(helpers))
        for helpers in running:
            helpers.request_abort()
        jobs = [helpers.job for helpers in running]
        if self._async_running:
            with self._stopped:
                tasks = [task for task in self._async_running.values() if task is not None]
            loop = self._aio_loop()
            for task in tasks:
                # One loop step later than the abort signal: a handler awaiting
                # helpers.aborted() resumes first, then is cancelled at its next await.
                loop.call_soon_threadsafe(_cancel_next_step, loop, task)
        return jobs

    def signal_abort(self) -> None:
        """Set the abort event of every running job (the graceful timeout passed)."""
        for helpers in self.running():
            helpers.request_abort()

    # --- a worker thread ----------------------------------------------------------

    def _work(self, index: int, worker_id: str) -> None:
        error: BaseException | None = None
        replaced = False
        try:
            if self._slots is None:
                replaced = self._take_plain(index, worker_id)
            else:
                replaced = self._take_gated(index, worker_id, self._slots)
        except BaseException as exc:
            error = exc
            logger.exception("Worker %s crashed", worker_id)
            self._ctx.bus.emit(events.worker_fatal_error, worker_id=worker_id, error=exc)
            self._ctx.fatal("worker", exc)
        finally:
            if replaced:
                # It timed out: the slot's accounting moved on when the watchdog
                # ended the run; this thread only leaves.
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
            last = self._alive == 0 and self._in_flight == 0
            self._stopped.notify_all()
        if last:
            self._on_all_stopped()

    def _take_plain(self, index: int, worker_id: str) -> bool:
        """Run job after job on this thread (a task map of plain handlers only).

        True when a job timed out and another thread took the slot over.
        """
        take = self._ctx.queue.take
        doubt = self._ctx.ownership.doubt
        confirm = self._confirm
        cancels = self._cancels
        while True:
            item = take()
            if item is None:
                return False
            job, known_at = item
            reason = doubt(known_at)
            if reason is not None and not confirm(job, reason):
                continue  # another pool holds it now
            if cancels and job.id in cancels:
                self._fail_unstarted(worker_id, job, cancels.pop(job.id, "cancelled"))
                continue
            if not self._run(index, worker_id, job):
                return True

    def _take_gated(self, index: int, worker_id: str, slots: threading.Semaphore) -> bool:
        """Take a job only with a free slot; run a plain one here, hand an async one over.

        True when a plain job timed out and the watchdog freed its slot.
        """
        take = self._ctx.queue.take
        doubt = self._ctx.ownership.doubt
        confirm = self._confirm
        async_names = self._async_names
        cancels = self._cancels
        while True:
            slots.acquire()
            item = take()
            if item is None:
                slots.release()
                return False
            job, known_at = item
            reason = doubt(known_at)
            if reason is not None and not confirm(job, reason):
                slots.release()
                continue  # another pool holds it now
            if cancels and job.id in cancels:
                slots.release()
                self._fail_unstarted(worker_id, job, cancels.pop(job.id, "cancelled"))
                continue
            if job.task_identifier in async_names:
                self._submit(worker_id, job, slots)
                continue
            added = None
            with self._stopped:
                self._free_takers -= 1
                if self._free_takers <= 0 and len(self._threads) < self._max_threads:
                    # Every thread is (about to be) inside a plain handler: add one
                    # so that async jobs (and other plain ones) keep being taken.
                    added = self._add_thread_locked()
            if added is not None:
                self._launch(*added)
            ran = True
            try:
                ran = self._run(index, worker_id, job)
            finally:
                if ran:
                    slots.release()
                    with self._stopped:
                        self._free_takers += 1
            if not ran:
                return True

    def _add_thread_locked(self) -> tuple[str, threading.Thread]:
        """Register one more worker thread (the caller holds ``_stopped``)."""
        index = len(self._threads)
        if index >= len(self._running):
            self._running.append(None)  # beyond concurrency only to replace stuck threads
        worker_id = new_worker_id()
        thread = threading.Thread(
            target=self._work, args=(index, worker_id), name=f"kongtask-{worker_id}", daemon=True
        )
        self.worker_ids.append(worker_id)
        self._threads.append(thread)
        self._alive += 1
        self._free_takers += 1
        return worker_id, thread

    def _launch(self, worker_id: str, thread: threading.Thread) -> None:
        self._ctx.bus.emit(events.worker_create, worker_id=worker_id, tasks=sorted(self._ctx.tasks))
        thread.start()

    # --- one job ----------------------------------------------------------------

    def _run(self, index: int, worker_id: str, job: Job) -> bool:
        """Run one plain job; False when it timed out and this thread must leave its slot."""
        ctx = self._ctx
        helpers = Helpers(ctx, job, worker_id)
        self._running[index] = helpers
        ctx.bus.emit(events.job_start, worker_id=worker_id, job=job)
        timed: TimedRun | None = None
        if self._timeouts:
            timeout_s = self._timeouts.get(job.task_identifier)
            if timeout_s is not None:
                assert self._watchdog is not None
                timed = TimedRun(index, timeout_s, helpers.request_abort, (worker_id, helpers))
                self._watchdog.watch(timed)
        handler = ctx.tasks.get(job.task_identifier)
        result: Any = None
        error: BaseException | None = None
        started = time.perf_counter()
        try:
            if handler is None:
                raise LookupError(f"Unsupported task '{job.task_identifier}'")
            result = handler(job.payload, helpers)
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
        self._finish(worker_id, job, helpers, result, error, duration_ms)
        return True

    def _submit(self, worker_id: str, job: Job, slots: threading.Semaphore) -> None:
        """Hand an async job to the loop; its slot is freed when its coroutine ends."""
        aio = self._aio
        assert aio is not None
        helpers = AsyncHelpers(self._ctx, job, worker_id, aio)
        with self._stopped:
            self._in_flight += 1
            self._async_running[helpers] = None
        try:
            self._ctx.bus.emit(events.job_start, worker_id=worker_id, job=job)
            self._handoff.append((worker_id, job, helpers, slots))
            with self._stopped:
                wake = not self._handoff_scheduled
                self._handoff_scheduled = True
            if wake:
                # One wake-up of the loop per burst of jobs, not one per job.
                aio.loop.call_soon_threadsafe(self._spawn_handed_off)
        except BaseException:
            self._async_ended(helpers, slots)
            raise

    def _spawn_handed_off(self) -> None:
        """On the loop: start every job handed over since the last wake-up."""
        handoff = self._handoff
        while True:
            with self._stopped:
                if not handoff:
                    self._handoff_scheduled = False
                    return
            while handoff:
                self._spawn(*handoff.popleft())

    def _spawn(
        self,
        worker_id: str,
        job: Job,
        helpers: AsyncHelpers,
        slots: threading.Semaphore,
    ) -> None:
        """On the loop: start the job's task, unless a shutdown failed the job back meanwhile."""
        with self._stopped:
            abandoned = id(helpers) in self._abandoned
            if not abandoned:
                task = self._aio_loop().create_task(self._run_async(worker_id, job, helpers))
                self._async_running[helpers] = task
        if abandoned:
            self._async_ended(helpers, slots)
            return
        task.add_done_callback(lambda _: self._async_ended(helpers, slots))

    def _aio_loop(self) -> asyncio.AbstractEventLoop:
        assert self._aio is not None
        return self._aio.loop

    async def _run_async(self, worker_id: str, job: Job, helpers: AsyncHelpers) -> None:
        handler = self._ctx.tasks[job.task_identifier]
        timeout_s = self._timeouts.get(job.task_identifier) if self._timeouts else None
        result: Any = None
        error: BaseException | None = None
        started = time.perf_counter()
        try:
            if timeout_s is None:
                result = await handler(job.payload, helpers)
            else:
                async with asyncio.timeout(timeout_s) as scope:
                    result = await handler(job.payload, helpers)
        except TimeoutError as exc:
            if timeout_s is not None and scope.expired():
                # Past its timeout: the handler was cancelled; the attempt failed.
                helpers.request_abort()
                error = JobTimeoutError(timeout_s)
            else:
                error = exc
        except BaseException as exc:  # CancelledError too: the job failed
            error = exc
        duration_ms = (time.perf_counter() - started) * 1000.0
        try:
            self._finish(worker_id, job, helpers, result, error, duration_ms)
        except BaseException as exc:
            logger.exception("Recording the outcome of job %s failed", job.id)
            self._ctx.fatal("worker", exc)

    def _async_ended(self, helpers: AsyncHelpers, slots: threading.Semaphore) -> None:
        """An async job's coroutine ended (or never ran): free its slot and account for it."""
        with self._stopped:
            if self._async_running.pop(helpers, False) is False:
                return  # already accounted for
            self._abandoned.discard(id(helpers))
            self._in_flight -= 1
            last = self._alive == 0 and self._in_flight == 0
            self._stopped.notify_all()
        slots.release()
        if last:
            self._on_all_stopped()

    def _finish(
        self,
        worker_id: str,
        job: Job,
        helpers: Helpers,
        result: Any,
        error: BaseException | None,
        duration_ms: float,
    ) -> None:
        """Record a run's outcome: the outbox (with the run time), the events, the log line."""
        ctx = self._ctx
        bus = ctx.bus
        if self._abandoned and id(helpers) in self._abandoned:
            # Discarded now: the id of a Helpers that ended may be reused by a later one.
            self._abandoned.discard(id(helpers))
            logger.warning(
                "Task %s (%s) finished after a shutdown failed it back; ignoring the outcome",
                job.id,
                job.task_identifier,
            )
            return
        if self._cancels:
            cancelled = self._cancels.pop(job.id, None)
            if cancelled is not None:
                self._record_failure(
                    worker_id,
                    job,
                    JobCancelledError(cancelled.partition(": ")[2] or None),
                    duration_ms,
                    permanent=True,
                )
                return
        batch_errors: list[BaseException] | None = None
        replacement: list[Any] | None = None
        if error is None:
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
        if error is not None:
            self._record_failure(worker_id, job, error, duration_ms, batch_errors, replacement)
            return
        self._outbox.success(job, duration_ms / 1000.0)
        bus.emit(events.job_success, worker_id=worker_id, job=job)
        if not ctx.no_log_success and logger.isEnabledFor(logging.INFO):
            attempt = f", attempt {job.attempts} of {job.max_attempts}" if job.attempts > 1 else ""
            logger.info(
                "Completed task %s (%s, %.2fms%s) with success",
                job.id,
                job.task_identifier,
                duration_ms,
                attempt,
            )
        bus.emit(events.job_complete, worker_id=worker_id, job=job, error=None)

    def _record_failure(
        self,
        worker_id: str,
        job: Job,
        error: BaseException,
        duration_ms: float,
        batch_errors: list[BaseException] | None = None,
        replacement: list[Any] | None = None,
        *,
        permanent: bool = False,
    ) -> None:
        """Send a failed attempt to the outbox, emit its events and log it."""
        bus = self._ctx.bus
        message = error_message(error)
        self._outbox.failure(job, message, replacement, permanent, duration_ms / 1000.0)
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

    def _fail_unstarted(self, worker_id: str, job: Job, message: str) -> None:
        """A job cancelled while it waited in the local buffer: failed for good, never run."""
        logger.info("Task %s (%s) was cancelled before it started", job.id, job.task_identifier)
        self._record_failure(
            worker_id,
            job,
            JobCancelledError(message.partition(": ")[2] or None),
            0.0,
            permanent=True,
        )

    def _expired(self, run: TimedRun) -> None:
        """The watchdog's call for a run past its deadline (on the watchdog thread).

        Fails the attempt (for good if it was cancelled), asks the handler to
        stop, and hands the slot to a new thread; the old one is counted as
        stuck until its handler returns.
        """
        worker_id, helpers = run.info
        job: Job = helpers.job
        index = run.index
        thread: threading.Thread | None = None
        new_id = ""
        last = False
        slots = self._slots
        with self._stopped:
            if self._running[index] is helpers:
                self._running[index] = None
            abandoned = id(helpers) in self._abandoned
            self._abandoned.discard(id(helpers))
            self._stuck += 1
            if self._released:
                self._alive -= 1
                last = self._alive == 0 and self._in_flight == 0
            elif slots is not None:
                # Gated: the stuck thread leaves the live takers and a new one joins.
                self._alive -= 1
                new_id, thread = self._add_thread_locked()
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
        if slots is not None:
            slots.release()  # the stuck thread never will: its slot is free now
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
            self._launch(new_id, thread)
        elif last:
            self._on_all_stopped()


def _cancel_next_step(loop: asyncio.AbstractEventLoop, task: asyncio.Task[None]) -> None:
    """Cancel ``task`` once the callbacks already queued on ``loop`` have run."""
    loop.call_soon(task.cancel)


class _BatchError(Exception):
    """Some items of a batch job failed; the message lists them."""

    def __init__(self, errors: list[BaseException]) -> None:
        super().__init__("Batch failures:\n" + "\n".join(error_message(error) for error in errors))
        self.errors = errors


def error_message(error: BaseException) -> str:
    """The text stored as ``last_error``: the message, else the exception's name (sanitised)."""
    return last_error_text(error)
