"""Declared tasks: a handler with its name and defaults, made once with ``@kongtask.task``.

A declared :class:`Task` is still a plain handler (calling it calls the
function), so it goes anywhere a handler goes: a worker's ``tasks=`` mapping
or list. Its options tell the worker how to run it (``timeout_s``,
``executor``, ``isolate``) and tell enqueue what a job of it looks like by
default (``queue``, ``priority``, ``max_attempts``, ``job_key_mode``). It is
also accepted wherever a task name is (``add_job``, ``JobSpec`` via
:meth:`Task.spec`), and enqueues itself with :meth:`Task.defer`.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, overload

import psycopg

from kongtask.db.connecting import connect
from kongtask.db.conninfo import open_database, resolve_schema
from kongtask.db.migrate import migrate
from kongtask.db.statements import Queries
from kongtask.errors import ConfigurationError, InvalidJobError
from kongtask.job import Job
from kongtask.job_spec import JOB_KEY_MODES, JobSpec
from kongtask.jobs.enqueue import (
    add_job_on,
    add_job_on_async,
    check_async_connection,
    check_connection,
)

__all__ = ["EXECUTORS", "Task", "declared", "job_spec_for", "task"]

#: Where a task's handler runs: a worker thread (or the event loop, for an
#: ``async def``), or a child process outside the worker's GIL.
EXECUTORS = ("thread", "process")

Executor = Literal["thread", "process"]


@dataclass(frozen=True, slots=True, eq=False)
class Task:
    """A handler and its defaults; call it as the handler itself.

    ``timeout_s`` bounds one attempt (``None``: the worker's default);
    ``executor="process"`` runs it in a child process; ``isolate=True`` runs
    every attempt in a child of its own, so a crash costs that child only.
    """

    fn: Callable[..., Any]
    name: str
    queue: str | None = None
    priority: int | None = None
    max_attempts: int | None = None
    timeout_s: float | None = None
    job_key_mode: str | None = None
    executor: Executor = "thread"
    isolate: bool = False

    def __post_init__(self) -> None:
        where = f"task {self.name!r}"
        if not callable(self.fn):
            raise ConfigurationError(
                f"{where}: the handler is not callable: {self.fn!r}", name="fn", value=self.fn
            )
        if not isinstance(self.name, str) or not self.name:
            raise ConfigurationError(
                f"a task name must be a non-empty string, got {self.name!r}",
                name="name",
                value=self.name,
            )
        if self.timeout_s is not None and (
            isinstance(self.timeout_s, bool)
            or not isinstance(self.timeout_s, int | float)
            or not math.isfinite(self.timeout_s)
            or self.timeout_s <= 0
        ):
            raise ConfigurationError(
                f"{where}: timeout_s must be a positive number of seconds, got {self.timeout_s!r}",
                name="timeout_s",
                value=self.timeout_s,
            )
        if self.executor not in EXECUTORS:
            raise ConfigurationError(
                f"{where}: executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}",
                name="executor",
                value=self.executor,
            )
        if self.job_key_mode is not None and self.job_key_mode not in JOB_KEY_MODES:
            raise ConfigurationError(
                f"{where}: job_key_mode must be one of {', '.join(JOB_KEY_MODES)}, "
                f"got {self.job_key_mode!r}",
                name="job_key_mode",
                value=self.job_key_mode,
            )
        # The enqueue defaults are checked as a job would check them, so a bad
        # declaration fails at import, not at its first enqueue.
        try:
            JobSpec(
                self.name,
                queue_name=self.queue,
                max_attempts=self.max_attempts,
                priority=self.priority,
            )
        except InvalidJobError as exc:
            # Name the option as the declaration spells it (queue, name).
            field = {"queue_name": "queue", "identifier": "name"}.get(exc.field or "", exc.field)
            message = str(exc)
            if field is not None and exc.field is not None and message.startswith(exc.field):
                message = field + message[len(exc.field) :]
            raise ConfigurationError(f"{where}: {message}", name=field, value=exc.value) from None
        if not isinstance(self.isolate, bool):
            raise ConfigurationError(
                f"{where}: isolate must be True or False, got {self.isolate!r}",
                name="isolate",
                value=self.isolate,
            )

    def __call__(self, payload: Any, helpers: Any) -> Any:
        return self.fn(payload, helpers)

    @property
    def is_async(self) -> bool:
        """Whether the handler is an ``async def`` (it runs on the worker's event loop)."""
        return inspect.iscoroutinefunction(self.fn)

    def spec(
        self,
        payload: Any = None,
        *,
        queue_name: str | None = None,
        run_at: datetime | None = None,
        max_attempts: int | None = None,
        job_key: str | None = None,
        job_key_mode: str | None = None,
        priority: int | None = None,
        flags: Sequence[str] | None = None,
    ) -> JobSpec:
        """A :class:`JobSpec` for a job of this task: the declaration's defaults, then
        whatever this call gives (an argument left ``None`` keeps the default).

        The declared ``job_key_mode`` only concerns keyed jobs, so it is applied
        only when ``job_key`` is given.
        """
        return JobSpec(
            self.name,
            payload,
            queue_name=self.queue if queue_name is None else queue_name,
            run_at=run_at,
            max_attempts=self.max_attempts if max_attempts is None else max_attempts,
            job_key=job_key,
            job_key_mode=(
                job_key_mode if job_key_mode is not None or job_key is None else self.job_key_mode
            ),
            priority=self.priority if priority is None else priority,
            flags=flags,
        )

    def defer(
        self,
        payload: Any = None,
        *,
        connection: psycopg.Connection[Any] | None = None,
        connection_string: str | None = None,
        schema: str | None = None,
        queue_name: str | None = None,
        run_at: datetime | None = None,
        max_attempts: int | None = None,
        job_key: str | None = None,
        job_key_mode: str | None = None,
        priority: int | None = None,
        flags: Sequence[str] | None = None,
    ) -> Job:
        """Enqueue a job of this task with its defaults (overridden by the arguments).

        On ``connection`` (a ``psycopg.Connection``) the job is part of the
        caller's transaction: rolled back, it never existed. Otherwise, as
        :func:`kongtask.add_job`, a connection from ``connection_string`` (else
        ``DATABASE_URL``, the ``PG*`` variables or the embedded server) is
        opened, migrated on and closed for this one job.
        """
        spec = self.spec(
            payload,
            queue_name=queue_name,
            run_at=run_at,
            max_attempts=max_attempts,
            job_key=job_key,
            job_key_mode=job_key_mode,
            priority=priority,
            flags=flags,
        )
        if connection is not None:
            check_connection(connection, connection_string)
            return add_job_on(connection, _queries(resolve_schema(schema)), spec)
        queries = _queries(resolve_schema(schema))
        with open_database(connection_string) as conninfo, connect(conninfo) as conn:
            migrate(conn, queries.schema)
            return add_job_on(conn, queries, spec)

    async def defer_async(
        self,
        payload: Any = None,
        *,
        connection: psycopg.AsyncConnection[Any] | None = None,
        connection_string: str | None = None,
        schema: str | None = None,
        queue_name: str | None = None,
        run_at: datetime | None = None,
        max_attempts: int | None = None,
        job_key: str | None = None,
        job_key_mode: str | None = None,
        priority: int | None = None,
        flags: Sequence[str] | None = None,
    ) -> Job:
        """:meth:`defer` for async code: on an ``AsyncConnection`` in its transaction,
        or without one on a connection of its own (opened in a thread, so the
        event loop never blocks on it)."""
        overrides: dict[str, Any] = {
            "queue_name": queue_name,
            "run_at": run_at,
            "max_attempts": max_attempts,
            "job_key": job_key,
            "job_key_mode": job_key_mode,
            "priority": priority,
            "flags": flags,
        }
        if connection is None:
            return await asyncio.to_thread(
                lambda: self.defer(
                    payload, connection_string=connection_string, schema=schema, **overrides
                )
            )
        check_async_connection(connection)
        if connection_string is not None:
            raise ConfigurationError(
                "give either connection_string or connection=, not both", name="connection"
            )
        spec = self.spec(payload, **overrides)
        return await add_job_on_async(connection, _queries(resolve_schema(schema)), spec)


@functools.lru_cache(maxsize=16)
def _queries(schema: str) -> Queries:
    """The statements for ``schema``, composed once for every ``defer`` on it."""
    return Queries(schema)


def declared(handler: Any) -> Task | None:
    """The declaration behind a handler, or ``None`` for a plain callable."""
    return handler if isinstance(handler, Task) else None


def job_spec_for(identifier: str | Task, payload: Any = None, **fields: Any) -> JobSpec:
    """The spec of one job named by a task name or by its :class:`Task` (whose
    defaults then apply); the enqueue entry points accept either."""
    if isinstance(identifier, Task):
        return identifier.spec(payload, **fields)
    return JobSpec(identifier, payload, **fields)


@overload
def task(fn: Callable[..., Any], /) -> Task: ...


@overload
def task(
    *,
    name: str | None = None,
    queue: str | None = None,
    priority: int | None = None,
    max_attempts: int | None = None,
    timeout_s: float | None = None,
    job_key_mode: str | None = None,
    executor: Executor = "thread",
    isolate: bool = False,
) -> Callable[[Callable[..., Any]], Task]: ...


def task(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    queue: str | None = None,
    priority: int | None = None,
    max_attempts: int | None = None,
    timeout_s: float | None = None,
    job_key_mode: str | None = None,
    executor: Executor = "thread",
    isolate: bool = False,
) -> Task | Callable[[Callable[..., Any]], Task]:
    """Declare a handler: ``@task`` or ``@task(name=..., timeout_s=...)``.

    The name defaults to the function's ``__name__``.
    """

    def declare(f: Callable[..., Any]) -> Task:
        return Task(
            fn=f,
            name=name if name is not None else getattr(f, "__name__", ""),
            queue=queue,
            priority=priority,
            max_attempts=max_attempts,
            timeout_s=timeout_s,
            job_key_mode=job_key_mode,
            executor=executor,
            isolate=isolate,
        )

    return declare if fn is None else declare(fn)
