"""The ``helpers`` object a task handler receives next to its payload.

It gives the handler what graphile-worker's helpers give a task: the job, a
logger scoped to it, enqueueing, pooled database access, the job's queue name
and an abort signal (a ``threading.Event`` set when a graceful shutdown runs
out of patience, the attempt's timeout passes or the job is cancelled). One
is made per job, so it is kept small and lazy.

An ``async def`` handler gets :class:`AsyncHelpers`: the same, plus awaitable
database access (an async pooled connection, ``query_async``,
``add_job_async``, ``add_jobs_async``, ``get_queue_name_async``) and
``await helpers.aborted()``. Its synchronous methods still work but block the
event loop (and every other async job) while they wait.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.rows import dict_row

from kongtask.db.connecting import without_deadline, without_deadline_async
from kongtask.declared import Task, job_spec_for
from kongtask.errors import KongtaskError
from kongtask.job import Job
from kongtask.job_spec import JobSpec
from kongtask.jobs.enqueue import add_job_on, add_job_on_async, add_jobs_on, add_jobs_on_async

if TYPE_CHECKING:
    from kongtask.protocols import AsyncHelpersContext, HelpersContext

__all__ = ["AsyncHelpers", "Helpers"]

_job_logger = logging.getLogger("kongtask.job")
# Guards the lazy creation of abort events against a concurrent abort request.
_ABORT_LOCK = threading.Lock()


class Helpers:
    """What a handler may use besides its payload; one per job run."""

    __slots__ = (
        "_abort_event",
        "_abort_requested",
        "_ctx",
        "_logger",
        "job",
        "worker_id",
    )

    def __init__(self, ctx: HelpersContext, job: Job, worker_id: str) -> None:
        self._ctx = ctx
        self.job = job
        self.worker_id = worker_id
        # The abort event is made on first use: a threading.Event costs more
        # than the rest of a quick job's bookkeeping, and most handlers never
        # look at it.
        self._abort_event: threading.Event | None = None
        self._abort_requested = False
        self._logger: logging.LoggerAdapter[logging.Logger] | None = None

    @property
    def abort_event(self) -> threading.Event:
        """Set when the job should stop: a graceful shutdown's abort timeout or the
        attempt's timeout passed, or the job was cancelled."""
        event = self._abort_event
        if event is None:
            with _ABORT_LOCK:
                event = self._abort_event
                if event is None:
                    event = self._abort_event = threading.Event()
                    if self._abort_requested:
                        event.set()
        return event

    def request_abort(self) -> None:
        """Set the abort event (now, or when the handler first asks for it)."""
        with _ABORT_LOCK:
            self._abort_requested = True
            event = self._abort_event
        if event is not None:
            event.set()

    @property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger whose records carry the worker id, task identifier and job id."""
        if self._logger is None:
            job = self.job
            self._logger = _JobLogger(
                _job_logger,
                {
                    "worker_id": self.worker_id,
                    "task_identifier": job.task_identifier,
                    "job_id": job.id,
                },
            )
        return self._logger

    @contextmanager
    def with_connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection (autocommit) for the ``with`` block."""
        # The handler's own queries may legitimately run long: no kongtask deadline.
        with self._ctx.pool.connection() as conn, without_deadline(conn):
            yield conn

    def query(
        self, query: Any, params: Sequence[Any] | Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """Run one statement on a pooled connection; returns its rows as dicts ([] if none)."""
        with (
            self._ctx.pool.connection() as conn,
            without_deadline(conn),
            conn.cursor(row_factory=dict_row) as cur,
        ):
            cur.execute(query, params)
            return cur.fetchall() if cur.description is not None else []

    def add_job(self, identifier: str | Task, payload: Any = None, **spec: Any) -> Job:
        """Add a job (same arguments as ``WorkerUtils.add_job``, a declared task included)."""
        job_spec = job_spec_for(identifier, payload, **spec)
        with self._ctx.pool.connection() as conn:
            return add_job_on(conn, self._ctx.queries, job_spec)

    def add_jobs(
        self, specs: Iterable[JobSpec | Mapping[str, Any]], *, job_key_preserve_run_at: bool = False
    ) -> list[Job]:
        """Add many jobs in one statement (same arguments as ``WorkerUtils.add_jobs``)."""
        with self._ctx.pool.connection() as conn:
            return add_jobs_on(
                conn, self._ctx.queries, specs, job_key_preserve_run_at=job_key_preserve_run_at
            )

    def get_queue_name(self, queue_id: int | None = None) -> str | None:
        """The name of the job's queue (or of ``queue_id``); ``None`` if it has none."""
        if queue_id is None:
            queue_id = self.job.job_queue_id
        if queue_id is None:
            return None
        names = self._ctx.queue_names
        name = names.get(queue_id)
        if name is None:
            rows = self.query(self._ctx.queries.queue_names, {"ids": [queue_id]})
            for row in rows:
                names[row["id"]] = row["queue_name"]
            name = names.get(queue_id)
            if name is None:
                raise KongtaskError(f"Queue with id '{queue_id}' not found")
        return name


class AsyncHelpers(Helpers):
    """The helpers of an ``async def`` handler: :class:`Helpers` plus awaitable variants."""

    __slots__ = ("_aborted", "_aio")

    def __init__(
        self, ctx: HelpersContext, job: Job, worker_id: str, aio: AsyncHelpersContext
    ) -> None:
        super().__init__(ctx, job, worker_id)
        self._aio = aio
        self._aborted: asyncio.Event | None = None

    def request_abort(self) -> None:
        """Set the abort signal, for ``abort_event`` and for :meth:`aborted` waiters alike."""
        super().request_abort()
        with _ABORT_LOCK:
            event = self._aborted
        if event is not None:
            self._aio.loop.call_soon_threadsafe(event.set)

    async def aborted(self) -> None:
        """Return once a graceful shutdown's abort timeout passes (at once if it has)."""
        with _ABORT_LOCK:
            if self._abort_requested:
                return
            event = self._aborted
            if event is None:
                event = self._aborted = asyncio.Event()
        await event.wait()

    @asynccontextmanager
    async def connection_async(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """An async pooled connection (autocommit) for the ``async with`` block."""
        pool = await self._aio.async_pool()
        async with pool.connection() as conn:
            with without_deadline_async(conn):
                yield conn

    async def query_async(
        self, query: Any, params: Sequence[Any] | Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """Run one statement on an async pooled connection; its rows as dicts ([] if none)."""
        async with self.connection_async() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(query, params)
            return await cur.fetchall() if cur.description is not None else []

    async def add_job_async(self, identifier: str, payload: Any = None, **spec: Any) -> Job:
        """Add a job without blocking the loop (same arguments as :meth:`Helpers.add_job`)."""
        job_spec = JobSpec(identifier, payload, **spec)
        pool = await self._aio.async_pool()
        async with pool.connection() as conn:
            return await add_job_on_async(conn, self._ctx.queries, job_spec)

    async def add_jobs_async(
        self, specs: Iterable[JobSpec | Mapping[str, Any]], *, job_key_preserve_run_at: bool = False
    ) -> list[Job]:
        """Add many jobs in one statement without blocking the loop (see ``add_jobs``)."""
        pool = await self._aio.async_pool()
        async with pool.connection() as conn:
            return await add_jobs_on_async(
                conn, self._ctx.queries, specs, job_key_preserve_run_at=job_key_preserve_run_at
            )

    async def get_queue_name_async(self, queue_id: int | None = None) -> str | None:
        """:meth:`Helpers.get_queue_name` without blocking the loop on a lookup."""
        if queue_id is None:
            queue_id = self.job.job_queue_id
        if queue_id is None:
            return None
        names = self._ctx.queue_names
        name = names.get(queue_id)
        if name is None:
            rows = await self.query_async(self._ctx.queries.queue_names, {"ids": [queue_id]})
            for row in rows:
                names[row["id"]] = row["queue_name"]
            name = names.get(queue_id)
            if name is None:
                raise KongtaskError(f"Queue with id '{queue_id}' not found")
        return name


class _JobLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefixes messages like graphile-worker: ``[job(worker-…: task{id})]``."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = self.extra or {}
        prefix = f"[job({extra['worker_id']}: {extra['task_identifier']}{{{extra['job_id']}}})]"
        kwargs.setdefault("extra", {}).update(extra)
        return f"{prefix} {msg}", kwargs
