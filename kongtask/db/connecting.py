"""Opening database connections that cannot hang: timeouts on every wait.

A path that goes silent (a NAT table or firewall forgetting the flow, a peer
host that vanished) never delivers an error: without a deadline the worker
would wait for ever. So every connection kongtask opens (its pool, the
LISTEN connection, migrations, ``WorkerUtils``, cron) gets:

- ``connect_timeout`` (libpq has no default; psycopg's is 130 s);
- TCP keepalives and ``tcp_user_timeout``, so the kernel gives up on a peer
  that stopped acknowledging;
- a client-side deadline on every wait for the server's answer
  (:class:`DeadlineConnection`). The server never sees a statement sent into
  a silent path, so its own ``statement_timeout`` cannot fire; and pgbouncer
  refuses ``options=-c ...`` startup parameters. When the deadline passes,
  the statement is cancelled (best effort) and the connection closed, which
  the caller sees as a lost connection and retries on a fresh one.

Values already present in the connection string (or the ``PG*`` variable)
win over kongtask's defaults. With ``pgbouncer=True`` prepared statements are
off, since transaction pooling hands each transaction to any server session.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import capabilities
from psycopg import errors as pg_errors
from psycopg.abc import PQGen
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import Row
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from kongtask.db.conninfo import describe_conninfo
from kongtask.db.timestamps import tolerate_timestamps
from kongtask.settings import ConnectionSettings

__all__ = [
    "CHECK_TIMEOUT_S",
    "DEFAULT_CONNECTION_SETTINGS",
    "AsyncDeadlineConnection",
    "DeadlineConnection",
    "DeadlineExceeded",
    "cancel_and_wait",
    "check_async_connection",
    "check_connection",
    "connect",
    "guarded_conninfo",
    "open_async_pool",
    "prepare_threshold",
    "without_deadline",
    "without_deadline_async",
]

logger = logging.getLogger(__name__)

DEFAULT_CONNECTION_SETTINGS = ConnectionSettings()

#: How long a pool's health check waits for an idle connection's answer.
CHECK_TIMEOUT_S = 5.0

#: How long a timed-out statement's cancel request may take before the connection is closed.
_CANCEL_TIMEOUT_S = 2.0

# psycopg raises this (a private class) from Connection.wait(timeout=...).
_WAIT_TIMEOUT: type[BaseException] = getattr(pg_errors, "_WaitTimeout", TimeoutError)

# libpq parameters kongtask sets that an environment variable may also set.
_ENVIRONMENT = {"connect_timeout": "PGCONNECT_TIMEOUT"}


class DeadlineExceeded(psycopg.OperationalError):
    """The server did not answer within the deadline; the connection was closed.

    A subclass of ``OperationalError`` so every retry path treats it as the
    lost connection it is.
    """


class DeadlineConnection(psycopg.Connection[Row]):
    """A psycopg connection whose every wait for the server has a deadline.

    ``deadline_s`` (seconds, ``None`` for none) bounds each wait for the
    server inside a statement, a fetch or a commit. Waits that pass their own
    timeout (``notifies(timeout=...)``) keep it.
    """

    deadline_s: float | None = None

    def wait(
        self,
        gen: PQGen[Any],
        interval: float = 0.1,
        timeout: float | None = None,
    ) -> Any:
        deadline = self.deadline_s
        if timeout is not None or deadline is None:
            return super().wait(gen, interval, timeout)
        try:
            return super().wait(gen, interval, deadline)
        except _WAIT_TIMEOUT:
            self._abandon()
            raise DeadlineExceeded(
                f"the database did not answer within {deadline:g} s; the connection was "
                "closed (statement_timeout_s)"
            ) from None

    def _abandon(self) -> None:
        """Cancel what the server may still be running for us, then close the connection."""
        if capabilities.has_cancel_safe():
            # Non-blocking (libpq 17): a silent server cannot hold us past the timeout.
            try:
                self.cancel_safe(timeout=_CANCEL_TIMEOUT_S)
            except Exception as exc:
                logger.debug("Cancelling a timed-out statement failed: %s", exc)
        self.pgconn.finish()


class AsyncDeadlineConnection(psycopg.AsyncConnection[Row]):
    """:class:`DeadlineConnection` for asyncio: every wait for the server has a deadline."""

    deadline_s: float | None = None

    async def wait(
        self,
        gen: PQGen[Any],
        interval: float = 0.1,
        timeout: float | None = None,
    ) -> Any:
        deadline = self.deadline_s
        if timeout is not None or deadline is None:
            return await super().wait(gen, interval, timeout)
        try:
            return await super().wait(gen, interval, deadline)
        except _WAIT_TIMEOUT:
            # No cancel request here: a blocking one would stall the event loop.
            self.pgconn.finish()
            raise DeadlineExceeded(
                f"the database did not answer within {deadline:g} s; the connection was "
                "closed (statement_timeout_s)"
            ) from None


def _seconds(value: float) -> int:
    return max(1, math.ceil(value))


def guarded_conninfo(conninfo: str, settings: ConnectionSettings, **extra: Any) -> str:
    """``conninfo`` with connect timeout, keepalives and ``tcp_user_timeout`` added.

    A parameter already in ``conninfo`` (or set by its ``PG*`` variable) is
    kept as given. ``extra`` parameters (``application_name``) always apply.
    """
    present = conninfo_to_dict(conninfo) if conninfo else {}
    wanted: dict[str, Any] = {
        "connect_timeout": _seconds(settings.connect_timeout_s),
        "keepalives": 1,
        "keepalives_idle": settings.keepalives_idle_s,
        "keepalives_interval": settings.keepalives_interval_s,
        "keepalives_count": settings.keepalives_count,
        "tcp_user_timeout": int(settings.tcp_user_timeout_s * 1000),
    }
    added = {
        key: value
        for key, value in wanted.items()
        if key not in present and not os.environ.get(_ENVIRONMENT.get(key, ""))
    }
    return make_conninfo(conninfo, **added, **extra)


def prepare_threshold(settings: ConnectionSettings, prepared_statements: bool = True) -> int | None:
    """psycopg's ``prepare_threshold`` for these settings (``None``: never prepare)."""
    if settings.pgbouncer or not prepared_statements:
        return None
    return 0


def connect(
    conninfo: str,
    settings: ConnectionSettings = DEFAULT_CONNECTION_SETTINGS,
    *,
    autocommit: bool = True,
    **extra: Any,
) -> DeadlineConnection[Any]:
    """Open one connection with kongtask's timeouts (see the module docstring).

    Prepared statements follow psycopg's default unless ``settings.pgbouncer``
    turns them off. ``extra`` libpq parameters (``application_name``) are
    added to the conninfo.
    """
    threshold: int | None = None if settings.pgbouncer else 5
    try:
        conn: DeadlineConnection[Any] = DeadlineConnection.connect(
            guarded_conninfo(conninfo, settings, **extra),
            autocommit=autocommit,
            prepare_threshold=threshold,
        )
    except pg_errors.ConnectionTimeout:
        # Say where and how long (never the password: describe_conninfo leaves it out).
        raise pg_errors.ConnectionTimeout(
            f"no answer from {describe_conninfo(conninfo)} within "
            f"{max(2, _seconds(settings.connect_timeout_s))} s (connection timeout; "
            "connect_timeout_s, --connect-timeout)"
        ) from None
    conn.deadline_s = settings.statement_timeout_s
    tolerate_timestamps(conn)
    return conn


def open_pool(
    conninfo: str,
    settings: ConnectionSettings,
    *,
    name: str,
    min_size: int,
    max_size: int,
    deadline_s: float | None,
    prepared_statements: bool = True,
    open_timeout_s: float = 30.0,
) -> ConnectionPool[Any]:
    """Open a pool of :class:`DeadlineConnection` with kongtask's timeouts; every pool is one.

    Each connection gets ``deadline_s`` for every wait on the server, the
    tolerant timestamp loader, and a check on checkout; ``conninfo`` is guarded
    (connect timeout, keepalives) and sessions show ``name`` as their
    ``application_name``.
    """

    def configure(conn: Any) -> None:
        conn.deadline_s = deadline_s
        # A hostile timestamp in a row read must not fail the statement.
        tolerate_timestamps(conn)

    pool: ConnectionPool[Any] = ConnectionPool(
        guarded_conninfo(conninfo, settings, application_name=name),
        min_size=min_size,
        max_size=max_size,
        connection_class=DeadlineConnection,
        kwargs={
            "autocommit": True,
            "prepare_threshold": prepare_threshold(settings, prepared_statements),
        },
        configure=configure,
        check=check_connection,
        name=name,
        open=False,
    )
    pool.open(wait=True, timeout=open_timeout_s)
    return pool


async def open_async_pool(
    conninfo: str,
    settings: ConnectionSettings,
    *,
    name: str,
    max_size: int,
    deadline_s: float | None,
    prepared_statements: bool = True,
    open_timeout_s: float = 30.0,
) -> AsyncConnectionPool[Any]:
    """:func:`open_pool` for asyncio: a pool of :class:`AsyncDeadlineConnection`.

    Same guarded ``conninfo``, deadline, tolerant timestamps and checkout
    check; it opens one connection at once and grows to ``max_size`` on demand.
    """

    async def configure(conn: Any) -> None:
        conn.deadline_s = deadline_s
        tolerate_timestamps(conn)

    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        guarded_conninfo(conninfo, settings, application_name=name),
        min_size=1,
        max_size=max_size,
        connection_class=AsyncDeadlineConnection,
        kwargs={
            "autocommit": True,
            "prepare_threshold": prepare_threshold(settings, prepared_statements),
        },
        configure=configure,
        check=check_async_connection,
        name=name,
        open=False,
    )
    try:
        await pool.open(wait=True, timeout=open_timeout_s)
    except BaseException:
        # A pool that never opened still runs its connecting tasks: stop them.
        await pool.close()
        raise
    return pool


async def check_async_connection(conn: psycopg.AsyncConnection[Any]) -> None:
    """:func:`check_connection` for an async pool's connections."""
    saved = getattr(conn, "deadline_s", None)
    if isinstance(conn, AsyncDeadlineConnection):
        conn.deadline_s = min(saved, CHECK_TIMEOUT_S) if saved is not None else CHECK_TIMEOUT_S
    try:
        await conn.execute("")
    finally:
        if isinstance(conn, AsyncDeadlineConnection):
            conn.deadline_s = saved


def check_connection(conn: psycopg.Connection[Any]) -> None:
    """The pool's health check: an empty statement answered within :data:`CHECK_TIMEOUT_S`.

    Raises (so the pool discards the connection and opens another) when an
    idle connection went half-open while it waited in the pool.
    """
    saved = getattr(conn, "deadline_s", None)
    if isinstance(conn, DeadlineConnection):
        conn.deadline_s = min(saved, CHECK_TIMEOUT_S) if saved is not None else CHECK_TIMEOUT_S
    try:
        # The empty statement: a round trip that runs nothing (no schema, so
        # nothing for kongtask/db/sql to hold), as psycopg_pool's own check.
        if conn.autocommit:
            conn.execute("")
        else:
            with conn.transaction():
                conn.execute("")
    finally:
        if isinstance(conn, DeadlineConnection):
            conn.deadline_s = saved


def cancel_and_wait(
    thread: threading.Thread | None,
    conn: psycopg.Connection[Any] | None,
    wait_s: float,
    what: str,
) -> None:
    """Cancel the statement ``thread`` runs on ``conn`` (a vacuum or an analyze of a
    stopping worker) and wait up to ``wait_s`` for the thread to end; never raises."""
    if thread is None or not thread.is_alive():
        return
    if conn is not None:
        try:
            conn.cancel_safe(timeout=2.0)
        except Exception:
            logger.debug("Cancelling %s failed", what, exc_info=True)
    thread.join(wait_s)


@contextmanager
def without_deadline(conn: psycopg.Connection[Any]) -> Iterator[psycopg.Connection[Any]]:
    """Lift the statement deadline for the ``with`` block (a task handler's own queries)."""
    if not isinstance(conn, DeadlineConnection):
        yield conn
        return
    saved = conn.deadline_s
    conn.deadline_s = None
    try:
        yield conn
    finally:
        conn.deadline_s = saved


@contextmanager
def without_deadline_async(
    conn: psycopg.AsyncConnection[Any],
) -> Iterator[psycopg.AsyncConnection[Any]]:
    """:func:`without_deadline` for an async connection (an async handler's own queries)."""
    if not isinstance(conn, AsyncDeadlineConnection):
        yield conn
        return
    saved = conn.deadline_s
    conn.deadline_s = None
    try:
        yield conn
    finally:
        conn.deadline_s = saved
