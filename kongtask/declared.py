"""Declared tasks: a handler with its name and defaults, made once with ``@kongtask.task``.

A declared :class:`Task` is still a plain handler (calling it calls the
function), so it goes anywhere a handler goes: a worker's ``tasks=`` mapping
or list. Its options tell the worker how to run it (``timeout_s``,
``executor``, ``isolate``) and tell enqueue what a job of it looks like by
default (``queue``, ``priority``, ``max_attempts``, ``job_key_mode``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, overload

from kongtask.errors import ConfigurationError

__all__ = ["EXECUTORS", "Task", "declared", "task"]

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


def declared(handler: Any) -> Task | None:
    """The declaration behind a handler, or ``None`` for a plain callable."""
    return handler if isinstance(handler, Task) else None


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
