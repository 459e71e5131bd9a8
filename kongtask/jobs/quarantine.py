"""Crash quarantine: a job that kills its worker process cannot take the fleet down for ever.

When a dead pool is released (:mod:`kongtask.jobs.liveness`), every job it
held becomes a *suspect*: its ``last_error`` says its pool died. Nobody knows
yet which of them killed it, so a suspect runs apart, and ordinary jobs as
before (no extra statement, no lock on their path):

- a suspect whose handler a child process can import (a top-level function
  or Task, see :mod:`kongtask.jobs.isolation`) runs in a child process of its
  own, at a lower CPU priority (:data:`SUSPECT_NICENESS`): a dead pool's jobs
  are rescued together, and they must not starve the healthy work of the CPU
  it shares with them. If the child dies, one crash is counted against the
  job at once, the attempt fails with a message naming the signal or exit
  code (the job stays a suspect), and after ``crash_quarantine_after``
  counted crashes the job is failed for good. The worker lives on: a poison
  job kills one worker (the run before it was suspected), never a second;
- any other suspect runs in the worker, one at a time per pool, after one
  statement names this pool as running it in ``_kongtask_job_crashes``; if the
  process dies then, the next release counts the crash against this job. When
  its handler returns, one statement records its success at once (or clears
  the mark), so the crash of the next suspect cannot make it run again.

Tasks declared ``isolate=True`` always run in a child of their own, and
``executor="process"`` tasks on a process pool; their crashes count alike.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

from kongtask.declared import declared
from kongtask.errors import ConfigurationError
from kongtask.job import Job
from kongtask.jobs.aio import is_async_handler
from kongtask.jobs.context import WorkerContext
from kongtask.jobs.isolation import (
    CRASH_PREFIX,
    ChildCrashed,
    Children,
    HandlerRef,
    ProcessTasks,
)
from kongtask.jobs.liveness import QUARANTINED_MESSAGE, SUSPECT_PREFIX

__all__ = ["SUSPECT_NICENESS", "CrashGuard", "is_suspect"]

logger = logging.getLogger(__name__)

#: How much lower a suspect's child runs (``os.nice``): it takes the CPU that
#: healthy jobs, the workers and the database leave over.
SUSPECT_NICENESS = 10


def is_suspect(job: Job) -> bool:
    """True when ``job`` was released from a pool that died while holding it, or its
    last attempt's child process died."""
    error = job.last_error
    return error is not None and error.startswith((SUSPECT_PREFIX, CRASH_PREFIX))


class CrashGuard:
    """Wraps task handlers so suspects (and isolated tasks) run apart."""

    def __init__(self, concurrency: int = 1) -> None:
        self._one_at_a_time = threading.Lock()
        self.ctx: WorkerContext | None = None
        self._process_tasks = ProcessTasks(concurrency)
        self._children = Children(concurrency)

    def wrap(self, name: str, handler: Callable[..., Any]) -> Callable[..., Any]:
        """The handler as the worker runs it; ConfigurationError when an isolated or
        process task cannot be imported by a child process."""
        task = declared(handler)
        if task is not None and (task.isolate or task.executor == "process"):
            if is_async_handler(handler):
                what = "isolate=True" if task.isolate else "executor='process'"
                raise ConfigurationError(
                    f"task {name!r} ({what}): an async def handler runs on the worker's "
                    "event loop; isolate it by making it a plain function",
                    name="tasks",
                    value=name,
                )
            try:
                ref = HandlerRef.of(handler)
            except ConfigurationError as exc:
                what = "isolate=True" if task.isolate else "executor='process'"
                raise ConfigurationError(
                    f"task {name!r} ({what}): {exc}", name="tasks", value=name
                ) from None
            if task.isolate:

                @functools.wraps(handler)
                def isolated(payload: Any, helpers: Any) -> Any:
                    return self._run_in_child(ref, payload, helpers, suspect=False)

                return isolated

            @functools.wraps(handler)
            def pooled(payload: Any, helpers: Any) -> Any:
                if is_suspect(helpers.job):
                    return self._run_in_child(ref, payload, helpers, suspect=True)
                return self._run_pooled(ref, payload, helpers)

            return pooled

        if is_async_handler(handler):
            # An async def handler stays one (the executor tells them apart); its
            # suspects run in the worker, marked and one at a time.

            @functools.wraps(handler)
            async def guarded_async(payload: Any, helpers: Any) -> Any:
                if not is_suspect(helpers.job):
                    return await handler(payload, helpers)
                return await self._run_suspect_async(handler, payload, helpers)

            return guarded_async

        child_ref = HandlerRef.maybe(handler)

        @functools.wraps(handler)
        def guarded(payload: Any, helpers: Any) -> Any:
            if not is_suspect(helpers.job):
                return handler(payload, helpers)
            if child_ref is not None:
                return self._run_in_child(child_ref, payload, helpers, suspect=True)
            return self._run_suspect(handler, payload, helpers)

        return guarded

    def close(self) -> None:
        """End the idle suspect children and the process pool of ``executor="process"``."""
        self._children.close()
        self._process_tasks.shutdown()

    def _run_in_child(self, ref: HandlerRef, payload: Any, helpers: Any, *, suspect: bool) -> Any:
        """A suspect's child is kept for the next suspect and runs at lower priority; an
        isolated task's runs one attempt."""
        ctx = self.ctx
        assert ctx is not None, "CrashGuard.ctx is set before any job runs"
        job: Job = helpers.job
        try:
            return self._children.run(
                ref,
                payload,
                job,
                helpers.worker_id,
                ctx.conninfo,
                helpers.abort_event,
                reuse=suspect,
                niceness=SUSPECT_NICENESS if suspect else 0,
            )
        except ChildCrashed as exc:
            raise self._crashed(job, str(exc)) from None

    def _run_pooled(self, ref: HandlerRef, payload: Any, helpers: Any) -> Any:
        ctx = self.ctx
        assert ctx is not None, "CrashGuard.ctx is set before any job runs"
        job: Job = helpers.job
        try:
            return self._process_tasks.run(
                ref, payload, job, helpers.worker_id, ctx.conninfo, helpers.abort_event
            )
        except ChildCrashed as exc:
            # Which job killed the pool's child is unknown: none is blamed, each
            # becomes a suspect and runs next in a child of its own.
            raise ChildCrashed(f"{CRASH_PREFIX} ({exc}); it runs next alone in a child") from None

    def _crashed(self, job: Job, how: str) -> ChildCrashed:
        """Count the crash against ``job``; the error its attempt fails with."""
        ctx = self.ctx
        assert ctx is not None
        limit = ctx.settings.crash_quarantine_after
        params = {"job_id": job.id, "pool_id": ctx.pool_id, "quarantine_after": limit}
        crashes: int | None = None
        try:
            with ctx.pool.connection() as conn:
                row = conn.execute(ctx.queries.record_child_crash, params).fetchone()
                crashes = int(row[0]) if row is not None else None
        except Exception as exc:
            logger.warning("Counting the crash of job %s failed: %s", job.id, exc)
        if crashes is not None and crashes >= limit:
            logger.error(
                "Quarantined job %s (%s): its child process died (%s), %d times; failed for good",
                job.id,
                job.task_identifier,
                how,
                crashes,
            )
            return ChildCrashed(QUARANTINED_MESSAGE % (crashes, ctx.pool_id))
        counted = f"crash {crashes} of {limit}" if crashes is not None else "crash not counted"
        logger.error(
            "The child process running job %s (%s) died (%s; %s); the worker goes on",
            job.id,
            job.task_identifier,
            how,
            counted,
        )
        return ChildCrashed(
            f"{CRASH_PREFIX} ({how}) in pool {ctx.pool_id}; {counted} before quarantine "
            "(crash_quarantine_after); the next attempt runs in a child process again"
        )

    async def _run_suspect_async(
        self, handler: Callable[..., Any], payload: Any, helpers: Any
    ) -> Any:
        """:meth:`_run_suspect` for an async handler: the lock and the two statements
        wait on a helper thread, so the loop keeps serving other jobs meanwhile."""
        ctx = self.ctx
        assert ctx is not None, "CrashGuard.ctx is set before any job runs"
        job: Job = helpers.job
        params = {"job_id": job.id, "pool_id": ctx.pool_id}
        await asyncio.to_thread(self._one_at_a_time.acquire)
        try:
            await asyncio.to_thread(self._mark, params)
            logger.info(
                "Job %s (%s) is a crash suspect (%s); running it alone among suspects",
                job.id,
                job.task_identifier,
                job.last_error,
            )
            succeeded = False
            try:
                result = await handler(payload, helpers)
                succeeded = not _has_failed_items(payload, result)
                return result
            finally:
                await asyncio.to_thread(self._record, job, params, succeeded)
        finally:
            self._one_at_a_time.release()

    def _mark(self, params: dict[str, Any]) -> None:
        ctx = self.ctx
        assert ctx is not None
        with ctx.pool.connection() as conn:
            conn.execute(ctx.queries.mark_suspect_running, params)

    def _record(self, job: Job, params: dict[str, Any], succeeded: bool) -> None:
        ctx = self.ctx
        assert ctx is not None
        try:
            with ctx.pool.connection() as conn:
                conn.execute(ctx.queries.finish_suspect, {**params, "succeeded": succeeded})
        except Exception as exc:
            # The completer still records the outcome; only the early record is lost.
            logger.warning("Recording suspect job %s's outcome failed: %s", job.id, exc)

    def _run_suspect(self, handler: Callable[..., Any], payload: Any, helpers: Any) -> Any:
        ctx = self.ctx
        assert ctx is not None, "CrashGuard.ctx is set before any job runs"
        job: Job = helpers.job
        params = {"job_id": job.id, "pool_id": ctx.pool_id}
        with self._one_at_a_time:
            self._mark(params)
            logger.info(
                "Job %s (%s) is a crash suspect (%s); running it alone among suspects",
                job.id,
                job.task_identifier,
                job.last_error,
            )
            succeeded = False
            try:
                result = handler(payload, helpers)
                succeeded = not _has_failed_items(payload, result)
                return result
            finally:
                self._record(job, params, succeeded)


def _has_failed_items(payload: Any, result: Any) -> bool:
    """A batch job's handler reports failed items as exceptions in its result list."""
    return (
        type(payload) is list
        and type(result) is list
        and len(result) == len(payload)
        and any(isinstance(item, BaseException) for item in result)
    )
