"""``KongtaskBackend``: Django tasks enqueued as kongtask (graphile-worker) jobs.

``task.enqueue(...)`` adds a job on Django's own connection for the backend's
database, so inside ``transaction.atomic()`` the job exists only if the
transaction commits (and a worker is told at commit). Mapping of the task's
attributes:

- identifier: the task's module path (``module.func``), the key of the worker's task map;
- payload: ``{"args": [...], "kwargs": {...}}`` (JSON, as Django requires);
- priority: Django's higher-is-sooner -100..100 becomes graphile's lower-is-sooner
  (``priority = -task.priority``);
- ``run_after`` becomes ``run_at``;
- ``queue_name`` is only checked against ``QUEUES`` (jobs of every queue run in
  parallel); a queue named in ``OPTIONS["SERIAL_QUEUES"]`` becomes the job's
  graphile ``queue_name``, so its jobs run one at a time in order.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from django.utils.module_loading import import_string

from kongtask.contrib.django._compat import (
    BaseTaskBackend,
    InvalidTask,
    Task,
    TaskError,
    TaskResult,
    TaskResultDoesNotExist,
    TaskResultStatus,
    task_enqueued,
)
from kongtask.contrib.django.connection import raw_connection
from kongtask.db.conninfo import resolve_schema
from kongtask.db.statements import Queries
from kongtask.errors import ConfigurationError
from kongtask.job import Job
from kongtask.ops.status import get_job
from kongtask.worker_utils import add_job

__all__ = ["KongtaskBackend", "graphile_priority"]

_STATUS_OF_STATE = {
    "ready": TaskResultStatus.READY,
    "scheduled": TaskResultStatus.READY,
    "retrying": TaskResultStatus.READY,
    "running": TaskResultStatus.RUNNING,
    "failed": TaskResultStatus.FAILED,
}
_OPTION_NAMES = frozenset({"DATABASE", "SCHEMA", "SERIAL_QUEUES", "MAX_ATTEMPTS"})


def graphile_priority(django_priority: int) -> int:
    """Django's priority (higher runs sooner) as graphile's (lower runs sooner)."""
    return -int(django_priority)


class KongtaskBackend(BaseTaskBackend):  # type: ignore[misc]
    """A Django task backend storing tasks as kongtask jobs in PostgreSQL.

    ``OPTIONS``: ``DATABASE`` (the Django database alias, default ``"default"``),
    ``SCHEMA`` (kongtask's schema, default ``graphile_worker``),
    ``SERIAL_QUEUES`` (Django queue names whose tasks run one at a time) and
    ``MAX_ATTEMPTS`` (attempts per job, default graphile's 25).
    """

    supports_defer = True
    supports_async_task = True
    supports_priority = True
    # A waiting, running or failed job can be looked up; a job that succeeded
    # is deleted (graphile-worker keeps no results), so its result is unknown.
    supports_get_result = True

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        options = self.options
        if not isinstance(options, Mapping):
            raise ConfigurationError(
                f"TASKS[{alias!r}]['OPTIONS'] must be a dict", name="OPTIONS", value=options
            )
        unknown = sorted(set(options) - _OPTION_NAMES)
        if unknown:
            raise ConfigurationError(
                f"TASKS[{alias!r}]['OPTIONS'] has unknown key(s) {', '.join(unknown)}; "
                f"the options are {', '.join(sorted(_OPTION_NAMES))}",
                name="OPTIONS",
                value=unknown,
            )
        database = options.get("DATABASE", "default")
        if not isinstance(database, str) or not database:
            raise ConfigurationError(
                f"TASKS[{alias!r}]['OPTIONS']['DATABASE'] must be a database alias",
                name="DATABASE",
                value=database,
            )
        self.database: str = database
        self.schema: str = resolve_schema(options.get("SCHEMA"))
        serial = options.get("SERIAL_QUEUES", ())
        if isinstance(serial, str) or not isinstance(serial, Sequence | set | frozenset):
            raise ConfigurationError(
                f"TASKS[{alias!r}]['OPTIONS']['SERIAL_QUEUES'] must be a list of queue names",
                name="SERIAL_QUEUES",
                value=serial,
            )
        self.serial_queues: frozenset[str] = frozenset(serial)
        max_attempts = options.get("MAX_ATTEMPTS")
        if max_attempts is not None and (
            not isinstance(max_attempts, int) or isinstance(max_attempts, bool) or max_attempts < 1
        ):
            raise ConfigurationError(
                f"TASKS[{alias!r}]['OPTIONS']['MAX_ATTEMPTS'] must be a positive int",
                name="MAX_ATTEMPTS",
                value=max_attempts,
            )
        self.max_attempts: int | None = max_attempts
        self._queries = Queries(self.schema)

    def enqueue(self, task: Any, args: Any, kwargs: Any) -> Any:
        """Add the task as a job in the caller's transaction on Django's connection."""
        self.validate_task(task)
        payload = {"args": list(args), "kwargs": dict(kwargs)}
        try:
            json.dumps(payload, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidTask(
                f"arguments of task {task.module_path} are not JSON-serialisable: {exc}"
            ) from exc
        job = add_job(
            task.module_path,
            payload,
            connection=raw_connection(self.database),
            schema=self.schema,
            queue_name=task.queue_name if task.queue_name in self.serial_queues else None,
            run_at=task.run_after,
            priority=graphile_priority(task.priority),
            max_attempts=self.max_attempts,
        )
        result = self._result(task, job, TaskResultStatus.READY)
        task_enqueued.send(type(self), task_result=result)
        return result

    def get_result(self, result_id: str) -> Any:
        """The result of a job still in the table: waiting, running or failed.

        A job that succeeded is gone (as is one removed or cleaned up), so its
        id raises ``TaskResultDoesNotExist``: kongtask stores no return values.
        """
        try:
            job_id = int(result_id)
        except (TypeError, ValueError):
            raise TaskResultDoesNotExist(result_id) from None
        if not 0 < job_id < 2**63:
            raise TaskResultDoesNotExist(result_id)
        info = get_job(raw_connection(self.database), self._queries, job_id)
        if info is None:
            raise TaskResultDoesNotExist(result_id)
        try:
            # A crontab names a task with ":" for "." (see worker.crontab_name).
            task = import_string(info.job.task_identifier.replace(":", "."))
        except ImportError:
            task = None
        if not isinstance(task, Task):
            raise TaskResultDoesNotExist(result_id)
        return self._result(task, info.job, _STATUS_OF_STATE[info.state])

    def _result(self, task: Any, job: Job, status: Any) -> Any:
        payload = job.payload if isinstance(job.payload, dict) else {}
        attempted = job.attempts > 0
        errors = (
            [TaskError(exception_class_path="builtins.Exception", traceback=job.last_error)]
            if job.last_error
            else []
        )
        return TaskResult(
            task=task,
            id=str(job.id),
            status=status,
            enqueued_at=job.created_at,
            started_at=job.locked_at,
            finished_at=job.updated_at if status == TaskResultStatus.FAILED else None,
            last_attempted_at=job.locked_at or (job.updated_at if attempted else None),
            args=list(payload.get("args", [])),
            kwargs=dict(payload.get("kwargs", {})),
            backend=self.alias,
            errors=errors,
            worker_ids=[job.locked_by or "kongtask"] * job.attempts,
        )
