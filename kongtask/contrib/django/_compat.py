"""The Django tasks API, from Django 6's ``django.tasks`` or else the ``django-tasks`` backport.

Both expose the same names; the backport calls the invalid-task exception
``InvalidTaskError`` where Django 6 says ``InvalidTask``.
"""

from __future__ import annotations

try:  # Django >= 6.0
    from django.tasks import (  # type: ignore[import-not-found,unused-ignore]
        TaskContext,
        TaskResult,
        TaskResultStatus,
        task_backends,
    )
    from django.tasks.backends.base import (  # type: ignore[import-not-found,unused-ignore]
        BaseTaskBackend,
    )
    from django.tasks.base import Task, TaskError  # type: ignore[import-not-found,unused-ignore]
    from django.tasks.exceptions import (  # type: ignore[import-not-found,unused-ignore]
        InvalidTask,
        TaskResultDoesNotExist,
    )
    from django.tasks.signals import task_enqueued  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # Django 5.2 with the django-tasks backport
    from django_tasks import TaskContext, TaskResult, TaskResultStatus, task_backends
    from django_tasks.backends.base import BaseTaskBackend
    from django_tasks.base import Task, TaskError
    from django_tasks.exceptions import InvalidTaskError as InvalidTask
    from django_tasks.exceptions import TaskResultDoesNotExist
    from django_tasks.signals import task_enqueued

__all__ = [
    "BaseTaskBackend",
    "InvalidTask",
    "Task",
    "TaskContext",
    "TaskError",
    "TaskResult",
    "TaskResultDoesNotExist",
    "TaskResultStatus",
    "task_backends",
    "task_enqueued",
]
