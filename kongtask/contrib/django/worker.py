"""The worker side: every Django task of the installed apps as a kongtask task map.

Tasks are found in each installed app's ``tasks`` module (as Django's
``autodiscover_modules("tasks")`` imports them) and keyed by module path, the
identifier the backend gives their jobs. A job runs the task's function with
the payload's args and kwargs; Django's database connections of the worker
thread are checked before and after each job, as a request would.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from django.apps import apps
from django.db import close_old_connections
from django.utils.module_loading import module_has_submodule

from kongtask.contrib.django._compat import Task, TaskContext, TaskResult, TaskResultStatus
from kongtask.errors import InvalidJobError
from kongtask.helpers import Helpers

__all__ = ["crontab_name", "discover_tasks", "task_map"]


def discover_tasks(extra_modules: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every Django ``Task`` in the installed apps' ``tasks`` modules (and ``extra_modules``),
    by module path."""
    modules = [
        importlib.import_module(f"{config.name}.tasks")
        for config in apps.get_app_configs()
        if module_has_submodule(config.module, "tasks")
    ]
    modules += [importlib.import_module(name) for name in extra_modules]
    found: dict[str, Any] = {}
    for module in modules:
        for value in vars(module).values():
            if isinstance(value, Task):
                found[value.module_path] = value
    return found


def task_map(tasks: dict[str, Any], backend_alias: str) -> dict[str, Any]:
    """kongtask handlers for Django tasks: async functions get async handlers.

    Each task is also served under its crontab name (:func:`crontab_name`):
    graphile's crontab grammar allows no dots in a task identifier.
    """
    handlers: dict[str, Any] = {}
    for identifier, task in tasks.items():
        kind = _AsyncCall if inspect.iscoroutinefunction(task.func) else _SyncCall
        handlers[identifier] = handlers[crontab_name(identifier)] = kind(task, backend_alias)
    return handlers


def crontab_name(identifier: str) -> str:
    """The name a crontab line gives a Django task: its module path with ``:`` for ``.``."""
    return identifier.replace(".", ":")


class _Call:
    """Turns a job into the call of a Django task's function."""

    __slots__ = ("backend_alias", "task")

    def __init__(self, task: Any, backend_alias: str) -> None:
        self.task = task
        self.backend_alias = backend_alias

    def arguments(self, payload: Any, helpers: Helpers) -> tuple[list[Any], dict[str, Any]]:
        """The function's args and kwargs (with the context first if the task takes it)."""
        if not isinstance(payload, dict):
            raise InvalidJobError(
                f"job {helpers.job.id} of Django task {self.task.module_path} has payload "
                f"{payload!r}; expected an object with args and kwargs",
                field="payload",
                value=payload,
            )
        args = payload.get("args", [])
        kwargs = payload.get("kwargs", {})
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise InvalidJobError(
                f"job {helpers.job.id} of Django task {self.task.module_path}: args must be "
                "a list and kwargs an object",
                field="payload",
                value=payload,
            )
        if self.task.takes_context:
            args = [self.context(helpers, args, kwargs), *args]
        return args, kwargs

    def context(self, helpers: Helpers, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """The ``TaskContext`` of this attempt (``attempt`` counts this one)."""
        job = helpers.job
        result = TaskResult(
            task=self.task,
            id=str(job.id),
            status=TaskResultStatus.RUNNING,
            enqueued_at=job.created_at,
            started_at=job.locked_at,
            finished_at=None,
            last_attempted_at=job.locked_at,
            args=args,
            kwargs=kwargs,
            backend=self.backend_alias,
            errors=[],
            worker_ids=[job.locked_by or "kongtask"] * job.attempts,
        )
        return TaskContext(task_result=result)


class _SyncCall(_Call):
    __slots__ = ()

    def __call__(self, payload: Any, helpers: Helpers, /) -> None:
        args, kwargs = self.arguments(payload, helpers)
        close_old_connections()
        try:
            self.task.func(*args, **kwargs)
        finally:
            close_old_connections()


class _AsyncCall(_Call):
    __slots__ = ()

    async def __call__(self, payload: Any, helpers: Helpers, /) -> None:
        args, kwargs = self.arguments(payload, helpers)
        await self.task.func(*args, **kwargs)
