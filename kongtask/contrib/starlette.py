"""kongtask in a Starlette or FastAPI application: lifespan, request connection, dashboard.

:class:`Kongtask` opens an async psycopg pool in the application's lifespan
(and, unless told otherwise, starts a :class:`~kongtask.Runner` next to it,
drained on shutdown), hands each request a connection whose transaction
commits when the endpoint succeeds and rolls back when it raises, so a job
enqueued there exists only if the request's own writes do, and mounts the
dashboard WSGI app under a path. Needs the ``fastapi`` extra.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from kongtask.declared import Task
from kongtask.errors import ConfigurationError
from kongtask.job import Job
from kongtask.ops.dashboard import Dashboard
from kongtask.runner import RUNNER_OPTIONS, Runner
from kongtask.validate import check_connection_string
from kongtask.worker_utils import add_job_async

__all__ = ["Kongtask"]

logger = logging.getLogger(__name__)


class Kongtask:
    """One database for one application: its pool, its optional worker, its dashboard.

    ``tasks`` (a task map or declared tasks) with ``run_worker=True`` starts a
    Runner in the lifespan, signals left to the server
    (``install_signal_handlers=False``); ``runner_options`` are the other
    :class:`~kongtask.RunnerOptions`. ``pool_min_size``/``pool_max_size`` size
    the request connection pool. Nothing is opened before the lifespan starts.
    """

    def __init__(
        self,
        connection_string: str,
        *,
        schema: str | None = None,
        tasks: Mapping[str, Callable[..., Any]] | Iterable[Task] | None = None,
        run_worker: bool = True,
        pool_min_size: int = 1,
        pool_max_size: int = 10,
        runner_options: Mapping[str, Any] | None = None,
    ) -> None:
        check_connection_string(connection_string, allow_none=False, allow_empty=False)
        if not isinstance(pool_min_size, int) or isinstance(pool_min_size, bool):
            raise ConfigurationError("pool_min_size must be an int", name="pool_min_size")
        if not isinstance(pool_max_size, int) or isinstance(pool_max_size, bool):
            raise ConfigurationError("pool_max_size must be an int", name="pool_max_size")
        if not 0 <= pool_min_size <= pool_max_size or pool_max_size < 1:
            raise ConfigurationError(
                f"need 0 <= pool_min_size <= pool_max_size and pool_max_size >= 1, got "
                f"{pool_min_size} and {pool_max_size}",
                name="pool_max_size",
            )
        extra = dict(runner_options or {})
        for name in sorted(extra):
            if name not in RUNNER_OPTIONS:
                raise ConfigurationError(
                    f"runner_options: unknown Runner option {name!r}", name="runner_options"
                )
            if name in ("tasks", "connection_string", "schema", "install_signal_handlers"):
                raise ConfigurationError(
                    f"runner_options: {name!r} is set by Kongtask itself", name="runner_options"
                )
        self.connection_string = connection_string
        self.schema = schema
        self._pool_sizes = (pool_min_size, pool_max_size)
        self._runner_options: dict[str, Any] | None = None
        if run_worker and tasks is not None:
            self._runner_options = {
                **extra,
                "tasks": tasks,
                "connection_string": connection_string,
                "schema": schema,
                "install_signal_handlers": False,
            }
            Runner(**self._runner_options)  # opens nothing: a bad option fails here, at import
        elif extra:
            raise ConfigurationError(
                "runner_options given but no worker runs (tasks is None or run_worker=False)",
                name="runner_options",
            )
        self._runner: Runner | None = None
        self._dashboards: list[Dashboard] = []
        self._pool: AsyncConnectionPool[Any] | None = None

    @property
    def runner(self) -> Runner | None:
        """The Runner of the running lifespan (None outside it or when this app runs no worker)."""
        return self._runner

    @property
    def pool(self) -> AsyncConnectionPool[Any]:
        """The request connection pool, open while the lifespan runs."""
        if self._pool is None:
            raise ConfigurationError(
                "the kongtask pool is not open: pass lifespan=kt.lifespan to the application "
                "(or enter kt.lifespan(app) in your own lifespan)",
                name="lifespan",
            )
        return self._pool

    @asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[None]:
        """Open the pool and start the worker; on shutdown drain the worker, close the pool.

        Usable as ``FastAPI(lifespan=kt.lifespan)`` / ``Starlette(lifespan=...)``
        or entered from the application's own lifespan. Starting and draining
        the Runner block, so they run in a thread, off the event loop.
        """
        min_size, max_size = self._pool_sizes
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            self.connection_string,
            min_size=min_size,
            max_size=max_size,
            open=False,
            name="kongtask-requests",
        )
        await pool.open(wait=True)
        self._pool = pool
        try:
            runner = None
            if self._runner_options is not None:
                # A Runner runs once: each lifespan (each server start) makes its own.
                runner = Runner(**self._runner_options)
                await asyncio.to_thread(runner.start)
                self._runner = runner
            try:
                yield
            finally:
                self._runner = None
                if runner is not None:
                    await asyncio.to_thread(runner.stop)
        finally:
            self._pool = None
            await pool.close()
            for dashboard in self._dashboards:
                await asyncio.to_thread(dashboard.close)

    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A request's connection (a FastAPI dependency): one transaction, committed on success.

        Use ``Depends(kt.connection, scope="function")`` so the commit happens
        before the response leaves: a client that got a 2xx knows its job
        exists. An exception in the endpoint rolls everything back.
        """
        async with self.transaction() as conn:
            yield conn

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """``async with kt.transaction() as conn``: the same, for plain Starlette endpoints."""
        async with self.pool.connection() as conn:
            # The pool commits when the block ends normally and rolls back on an
            # exception; the connection is not autocommit, so every statement
            # (the job's insert included) is part of that one transaction.
            yield conn

    async def add_job(
        self,
        conn: psycopg.AsyncConnection[Any],
        identifier: str | Task,
        payload: Any = None,
        **spec: Any,
    ) -> Job:
        """Add a job in ``conn``'s transaction, in this app's schema."""
        return await add_job_async(identifier, payload, connection=conn, schema=self.schema, **spec)

    def dashboard(self, **options: Any) -> Any:
        """The dashboard as an ASGI app, for ``app.mount("/kongtask", kt.dashboard())``.

        ``options`` are :class:`~kongtask.ops.dashboard.Dashboard`'s (``token``,
        ``allowed_hosts``, ...). It is an ASGI app (Starlette); its
        own small connection pool opens at the first request.
        """
        dashboard = Dashboard(self.connection_string, schema=self.schema, **options)
        self._dashboards.append(dashboard)
        return dashboard
