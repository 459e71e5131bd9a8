"""Crash quarantine: a job that kills its worker process cannot take the fleet down for ever.

When a dead pool is released (:mod:`kongtask.jobs.liveness`), every job it
held becomes a *suspect*: its ``last_error`` says its pool died. Nobody knows
yet which of them killed it, so a suspect runs under two rules, and ordinary
jobs under none (no extra statement, no lock on their path):

- before its handler starts, one statement names this pool as running it in
  ``_kongtask_job_crashes``; if the process dies now, the next release counts
  a crash against this job, and after ``crash_quarantine_after`` crashes it
  is failed for good with a ``last_error`` saying why;
- suspects run one at a time per pool, so two suspects are never blamed for
  one death; when a suspect's handler returns, one statement records its
  success at once (or just clears the mark on failure), so the crash of the
  next suspect cannot make it run again.

So the innocent jobs of a poison job's batch each run once after the
release and are never quarantined, and a crashing handler costs two
statements per suspect run, a pool death per crash, and (the first time,
before it is a suspect) the release bound.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

from kongtask.job import Job
from kongtask.jobs.aio import is_async_handler
from kongtask.jobs.context import WorkerContext
from kongtask.jobs.liveness import SUSPECT_PREFIX

__all__ = ["CrashGuard", "is_suspect"]

logger = logging.getLogger(__name__)


def is_suspect(job: Job) -> bool:
    """True when ``job`` was released from a pool that died while holding it."""
    return job.last_error is not None and job.last_error.startswith(SUSPECT_PREFIX)


class CrashGuard:
    """Wraps task handlers so suspects run marked, and one at a time."""

    def __init__(self) -> None:
        self._one_at_a_time = threading.Lock()
        self.ctx: WorkerContext | None = None

    def wrap(self, handler: Callable[..., Any]) -> Callable[..., Any]:
        """``handler`` itself for ordinary jobs; the suspect protocol for suspects.

        An ``async def`` handler stays one (the executor tells them apart).
        """
        if is_async_handler(handler):

            @functools.wraps(handler)
            async def guarded_async(payload: Any, helpers: Any) -> Any:
                if not is_suspect(helpers.job):
                    return await handler(payload, helpers)
                return await self._run_suspect_async(handler, payload, helpers)

            return guarded_async

        @functools.wraps(handler)
        def guarded(payload: Any, helpers: Any) -> Any:
            if not is_suspect(helpers.job):
                return handler(payload, helpers)
            return self._run_suspect(handler, payload, helpers)

        return guarded

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
