"""The Django app of kongtask (``INSTALLED_APPS += ["kongtask.contrib.django"]``)."""

from __future__ import annotations

from django.apps import AppConfig


class KongtaskConfig(AppConfig):  # type: ignore[misc]
    """Adds ``manage.py kongtask_worker``; the app has no models of its own."""

    name = "kongtask.contrib.django"
    label = "kongtask"
    verbose_name = "kongtask"
