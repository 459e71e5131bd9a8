"""Setting, clearing and listing fleet-wide limits and pauses (WorkerUtils, the CLI).

Each change is one transaction that also sends ``kongtask:limits``, so every
kongtask pool on the schema reads the limits again within moments (and within
a few seconds by its periodic check if the notice is missed). Bad input raises
:class:`~kongtask.errors.ConfigurationError` before anything is written.
"""

from __future__ import annotations

import getpass
import os
import socket
from typing import Any

import psycopg

from kongtask.db.statements import LOCK_EXPIRY, Queries
from kongtask.errors import ConfigurationError
from kongtask.jobs.limits import LimitInfo, PauseInfo, Rate, limit_key, parse_rate

__all__ = [
    "clear_limit",
    "default_paused_by",
    "list_limits",
    "list_pauses",
    "pause",
    "resume",
    "set_limit",
]


def default_paused_by() -> str:
    """Who is pausing, when not named: ``user@host/pid``."""
    try:
        user = getpass.getuser()
    except Exception:  # no user name in this environment (a bare container, say)
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    return f"{user}@{socket.gethostname()}/{os.getpid()}"


def _changed(conn: psycopg.Connection[Any], queries: Queries) -> None:
    conn.execute(queries.notify_limits, {"schema": queries.schema, "what": "changed"})


def set_limit(
    conn: psycopg.Connection[Any],
    queries: Queries,
    task: str | None = None,
    *,
    queue: str | None = None,
    flag: str | None = None,
    concurrency: int | None = None,
    rate: object = None,
) -> LimitInfo:
    """Create or replace the limit on one key; returns it as listed."""
    kind, key = limit_key(task, queue, flag)
    if concurrency is None and rate is None:
        raise ConfigurationError(
            f"limit on {kind} {key!r}: give concurrency=N and/or rate='N/s'",
            name="concurrency",
            value=None,
        )
    if concurrency is not None and (
        not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1
    ):
        raise ConfigurationError(
            f"limit on {kind} {key!r}: concurrency must be a whole number of at least 1, "
            f"not {concurrency!r}",
            name="concurrency",
            value=concurrency,
        )
    parsed: Rate | None = None if rate is None else parse_rate(rate)
    params = {
        "kind": kind,
        "key": key,
        "concurrency": concurrency,
        "rate_count": parsed.count if parsed else None,
        "rate_interval_s": parsed.interval_s if parsed else None,
    }
    with conn.transaction():
        row = conn.execute(queries.locked_index_exists, {"schema": queries.schema}).fetchone()
        if row is None or not row[0]:
            conn.execute(queries.create_locked_index)
        conn.execute(queries.set_limit, params)
        _changed(conn, queries)
    return next(row for row in list_limits(conn, queries) if (row.key_kind, row.key) == (kind, key))


def clear_limit(
    conn: psycopg.Connection[Any],
    queries: Queries,
    task: str | None = None,
    *,
    queue: str | None = None,
    flag: str | None = None,
) -> bool:
    """Remove the limit on one key; False if there was none."""
    kind, key = limit_key(task, queue, flag)
    with conn.transaction():
        removed = conn.execute(queries.clear_limit, {"kind": kind, "key": key}).rowcount
        _changed(conn, queries)
    return removed > 0


def list_limits(conn: psycopg.Connection[Any], queries: Queries) -> list[LimitInfo]:
    """Every limit, with how many jobs of its key are locked now."""
    rows = conn.execute(queries.list_limits, {"expiry": LOCK_EXPIRY}).fetchall()
    return [
        LimitInfo(
            key_kind=kind,
            key=key,
            concurrency=concurrency,
            rate=Rate(rate_count, rate_s) if rate_count is not None else None,
            running=running,
            updated_at=updated_at,
        )
        for kind, key, concurrency, rate_count, rate_s, updated_at, running in rows
    ]


def pause(
    conn: psycopg.Connection[Any],
    queries: Queries,
    task: str | None = None,
    *,
    queue: str | None = None,
    by: str | None = None,
) -> PauseInfo:
    """Pause a task or queue everywhere; pausing it again keeps the first pause."""
    kind, key = limit_key(task, queue, what="pause")
    if by is not None and (not isinstance(by, str) or not by.strip()):
        raise ConfigurationError(
            f"pause: by must be a non-empty name, not {by!r}", name="by", value=by
        )
    with conn.transaction():
        conn.execute(queries.pause_key, {"kind": kind, "key": key, "by": by or default_paused_by()})
        _changed(conn, queries)
    return next(row for row in list_pauses(conn, queries) if (row.key_kind, row.key) == (kind, key))


def resume(
    conn: psycopg.Connection[Any],
    queries: Queries,
    task: str | None = None,
    *,
    queue: str | None = None,
) -> bool:
    """Resume a paused task or queue; False if it was not paused."""
    kind, key = limit_key(task, queue, what="resume")
    with conn.transaction():
        removed = conn.execute(queries.resume_key, {"kind": kind, "key": key}).rowcount
        _changed(conn, queries)
    return removed > 0


def list_pauses(conn: psycopg.Connection[Any], queries: Queries) -> list[PauseInfo]:
    """Every paused task and queue, with who paused it and when."""
    return [
        PauseInfo(key_kind=kind, key=key, paused_by=by, paused_at=at)
        for kind, key, by, at in conn.execute(queries.list_pauses).fetchall()
    ]
