"""kongtask for Django: a task backend, ``manage.py kongtask_worker`` and the dashboard.

``INSTALLED_APPS += ["kongtask.contrib.django"]`` and
``TASKS = {"default": {"BACKEND": "kongtask.contrib.django.KongtaskBackend"}}``.
Works with Django 5.2 and the ``django-tasks`` backport, or Django 6's ``django.tasks``.
"""

from kongtask.contrib.django.backend import KongtaskBackend

__all__ = ["KongtaskBackend"]
