"""What a Runner's ``async def`` handlers run on: its event loop and an async pool.

Started only when the task map holds an async handler. The loop thread is
shared by every async job of the Runner; the ``AsyncConnectionPool`` their
``helpers`` use is opened on first use, through the same connecting code
(deadlines, keepalives, application name) as the worker's own pool.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from psycopg_pool import AsyncConnectionPool

from kongtask.db.connecting import open_async_pool
from kongtask.declared import declared
from kongtask.jobs.context import WorkerContext
from kongtask.runtime.event_loop import LoopThread

__all__ = ["AsyncJobs", "is_async_handler"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

_POOL_OPEN_TIMEOUT_S = 30.0


def is_async_handler(handler: Any) -> bool:
    """Whether ``handler`` (a plain callable or a declared Task) is an ``async def``."""
    task = declared(handler)
    if task is not None:
        return task.is_async
    if inspect.iscoroutinefunction(handler):
        return True
    # An object whose ``__call__`` is an ``async def`` is an async handler too.
    if inspect.isroutine(handler) or not callable(handler):
        return False
    return inspect.iscoroutinefunction(type(handler).__call__)


class AsyncJobs:
    """The event loop of one Runner's async handlers and their lazily opened pool."""

    def __init__(self, ctx: WorkerContext) -> None:
        self._ctx = ctx
        self._loop_thread = LoopThread(f"kongtask-loop-{ctx.pool_id}")
        self._pool: AsyncConnectionPool[Any] | None = None
        self._pool_lock: asyncio.Lock | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop async handlers run on."""
        return self._loop_thread.loop

    def threads(self) -> list[tuple[str, Any]]:
        """The loop thread with its name (for the health probe)."""
        thread = self._loop_thread.thread
        return [] if thread is None else [(self._loop_thread.name, thread)]

    def start(self) -> None:
        """Start the loop thread."""
        self._loop_thread.start()

    def submit(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        """Run ``coro`` on the loop (from any thread)."""
        return self._loop_thread.submit(coro)

    async def async_pool(self) -> AsyncConnectionPool[Any]:
        """The async pool, opened on first use (on the loop)."""
        pool = self._pool
        if pool is not None:
            return pool
        if self._pool_lock is None:
            self._pool_lock = asyncio.Lock()
        async with self._pool_lock:
            if self._pool is None:
                ctx = self._ctx
                settings = ctx.settings
                self._pool = await open_async_pool(
                    ctx.conninfo,
                    settings.connection,
                    name=ctx.pool_id,
                    max_size=settings.max_pool_size,
                    deadline_s=settings.statement_timeout_s,
                    prepared_statements=settings.prepared_statements,
                    open_timeout_s=_POOL_OPEN_TIMEOUT_S,
                )
            return self._pool

    def stop(self, timeout_s: float) -> None:
        """Close the async pool (if opened), then stop the loop; bounded by ``timeout_s`` each."""
        pool = self._pool
        if pool is not None:
            try:
                self.submit(pool.close(timeout=timeout_s)).result(timeout_s + 1.0)
            except Exception as exc:
                logger.warning("Closing the async pool of %s failed: %r", self._ctx.pool_id, exc)
            self._pool = None
        self._loop_thread.stop(timeout_s)
