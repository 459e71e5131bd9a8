"""Django's databases as kongtask sees them: the raw psycopg connection, or a conninfo.

The backend enqueues on the very connection Django uses (so ``transaction.atomic()``
covers the job); the worker and the dashboard open their own connections to the
same database, described by the alias's ``DATABASES`` entry.
"""

from __future__ import annotations

from typing import Any

import psycopg
from django.db import connections
from psycopg.conninfo import make_conninfo

from kongtask.errors import ConfigurationError

__all__ = ["conninfo_for", "raw_connection"]

#: ``DATABASES[...]["OPTIONS"]`` keys that Django reads itself (libpq would refuse them).
_DJANGO_ONLY_OPTIONS = frozenset(
    {"isolation_level", "server_side_binding", "pool", "assume_role", "cursor_factory", "context"}
)


def _check_alias(alias: str) -> Any:
    if alias not in connections.settings:
        raise ConfigurationError(
            f"Django has no database {alias!r} (DATABASES holds "
            f"{', '.join(sorted(connections.settings)) or 'nothing'})",
            name="DATABASE",
            value=alias,
        )
    wrapper = connections[alias]
    if wrapper.vendor != "postgresql":
        raise ConfigurationError(
            f"Django database {alias!r} uses the {wrapper.vendor!r} backend; kongtask "
            "needs django.db.backends.postgresql",
            name="DATABASE",
            value=alias,
        )
    return wrapper


def raw_connection(alias: str) -> psycopg.Connection[Any]:
    """The psycopg 3 connection behind Django's connection ``alias`` (opened if needed).

    It is the connection of the calling thread, in whatever transaction Django
    holds on it, so a job added on it commits or rolls back with the caller's work.
    """
    wrapper = _check_alias(alias)
    wrapper.ensure_connection()
    conn = wrapper.connection
    if not isinstance(conn, psycopg.Connection):
        raise ConfigurationError(
            f"Django database {alias!r} runs on {type(conn).__module__}, not psycopg 3; "
            "install psycopg (3) so Django's postgresql backend uses it",
            name="DATABASE",
            value=alias,
        )
    return conn


def conninfo_for(alias: str) -> str:
    """A libpq conninfo for the database of ``DATABASES[alias]`` (for kongtask's own pools)."""
    settings = _check_alias(alias).settings_dict
    params: dict[str, Any] = {
        "dbname": settings.get("NAME") or None,
        "user": settings.get("USER") or None,
        "password": settings.get("PASSWORD") or None,
        "host": settings.get("HOST") or None,
        "port": str(settings["PORT"]) if settings.get("PORT") else None,
    }
    for key, value in (settings.get("OPTIONS") or {}).items():
        if key not in _DJANGO_ONLY_OPTIONS and isinstance(value, str | int):
            params[key] = value
    return make_conninfo("", **{key: value for key, value in params.items() if value is not None})
