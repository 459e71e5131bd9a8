"""WorkerUtils: enqueue jobs and administer the queue from any Python process.

Each method is one statement over one connection and calls the schema's own
SQL functions where graphile-worker has them, so what a Node worker sees is
exactly what its own ``WorkerUtils`` would have written.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from datetime import datetime
from types import TracebackType
from typing import Any, Self

import psycopg
from psycopg.rows import dict_row, tuple_row

from kongtask.cron.service import store as cron_store
from kongtask.cron.service.store import CronRun, StoredCronItem
from kongtask.cron.types import ParsedCronItem
from kongtask.db.connecting import DEFAULT_CONNECTION_SETTINGS, connect
from kongtask.db.conninfo import open_database, resolve_schema
from kongtask.db.migrate import MigrationResult, migrate
from kongtask.db.statements import Queries
from kongtask.declared import Task, job_spec_for
from kongtask.errors import ConfigurationError, InvalidJobError, KongtaskError
from kongtask.job import Job
from kongtask.job_spec import JobSpec
from kongtask.jobs.cancel import CancelResult, cancel_params, cancel_result
from kongtask.jobs.enqueue import (
    add_job_on,
    add_job_on_async,
    add_jobs_on,
    add_jobs_on_async,
    check_async_connection,
    check_connection,
    jobs_from_query,
)
from kongtask.jobs.limits import LimitInfo, PauseInfo
from kongtask.ops import limits as fleet
from kongtask.ops import status as ops
from kongtask.ops.status import JobInfo, PoolInfo, StatusReport
from kongtask.settings import ConnectionSettings
from kongtask.validate import check_connection_string

__all__ = [
    "CLEANUP_TASKS",
    "WorkerUtils",
    "add_job",
    "add_job_async",
    "add_jobs",
    "add_jobs_async",
    "cancel_job",
    "cancel_job_async",
]

logger = logging.getLogger(__name__)

CLEANUP_TASKS = ("GC_TASK_IDENTIFIERS", "GC_JOB_QUEUES", "DELETE_PERMAFAILED_JOBS")
"""The cleanup tasks ``WorkerUtils.cleanup`` knows, as graphile-worker names them."""


class WorkerUtils:
    """Enqueue and administer jobs; a context manager holding one connection.

    Given a ``psycopg.Connection`` (positionally or as ``connection=``), every
    call runs on it inside its caller's current transaction: a rollback undoes
    the enqueue, a commit makes the job claimable at once (the insert's NOTIFY
    is delivered at commit). kongtask never commits, migrates on or closes a
    borrowed connection; its schema must already be installed.

    ``connection_string`` falls back to ``DATABASE_URL``, then the ``PG*``
    variables when ``PGDATABASE`` is set, then the embedded server. Opening
    runs the migrations (a no-op on an up-to-date database), as
    graphile-worker's WorkerUtils does. Methods are safe to call from several
    threads; they take turns on the connection. ``connection_settings`` sets
    the connect and statement timeouts, TCP keepalives and pgbouncer mode
    (:class:`kongtask.settings.ConnectionSettings`; its defaults otherwise).
    """

    def __init__(
        self,
        connection_string: str | psycopg.Connection[Any] | None = None,
        *,
        connection: psycopg.Connection[Any] | None = None,
        schema: str | None = None,
        migrate_on_open: bool = True,
        connection_settings: ConnectionSettings | None = None,
    ) -> None:
        if isinstance(connection_string, psycopg.Connection):
            if connection is not None:
                raise ConfigurationError(
                    "give either a connection or connection=, not both", name="connection"
                )
            connection, connection_string = connection_string, None
        if connection is not None:
            check_connection(connection, connection_string)
        check_connection_string(connection_string, alternatives=("a psycopg.Connection",))
        if connection_settings is not None and not isinstance(
            connection_settings, ConnectionSettings
        ):
            raise ConfigurationError(
                "connection_settings must be a kongtask.settings.ConnectionSettings or None",
                name="connection_settings",
                value=connection_settings,
            )
        self._connection_string = connection_string
        #: Timeouts and pgbouncer mode of the connection (kongtask's defaults if not given).
        self.connection_settings = connection_settings or DEFAULT_CONNECTION_SETTINGS
        self.schema = resolve_schema(schema)
        self._migrate_on_open = migrate_on_open
        self._queries = Queries(self.schema)
        # A borrowed connection is used as it is: in its caller's transaction,
        # never migrated on, committed or closed here.
        self._borrowed = connection
        self._conn: psycopg.Connection[Any] | None = None
        self._stack: ExitStack | None = None
        self._lock = threading.Lock()

    # --- lifecycle ----------------------------------------------------------

    def open(self) -> Self:
        """Connect (starting the embedded server if that is the configuration).

        With a borrowed ``connection`` nothing is opened or migrated.
        """
        if self._conn is not None:
            return self
        if self._borrowed is not None:
            self._conn = self._borrowed
            return self
        with ExitStack() as stack:
            conninfo = stack.enter_context(open_database(self._connection_string))
            conn = connect(conninfo, self.connection_settings)
            stack.callback(conn.close)
            if self._migrate_on_open:
                migrate(conn, self.schema)
            self._conn = conn
            self._stack = stack.pop_all()
        return self

    def close(self) -> None:
        """Close the connection (and stop the embedded server if we started it)."""
        stack, self._stack, self._conn = self._stack, None, None
        if stack is not None:
            stack.close()

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """The underlying connection, held exclusively for the ``with`` block."""
        if self._conn is None:
            raise KongtaskError("WorkerUtils is not open; use it as a context manager")
        with self._lock:
            if self._borrowed is None:
                yield self._conn
                return
            # kongtask's statements read tuples; a borrowed connection may have been
            # given another row factory by its owner, restored after the block.
            factory = self._conn.row_factory
            self._conn.row_factory = tuple_row
            try:
                yield self._conn
            finally:
                self._conn.row_factory = factory

    def _rows(self, query: Any, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        with self.connection() as conn, conn.cursor(row_factory=dict_row) as cursor:
            return cursor.execute(query, params).fetchall()

    def _jobs(self, query: Any, params: Mapping[str, Any]) -> list[Job]:
        with self.connection() as conn:
            return jobs_from_query(conn, self._queries, query, params)

    # --- migrations ---------------------------------------------------------

    def migrate(self) -> MigrationResult:
        """Bring the schema up to date (graphile-worker migration 19)."""
        with self.connection() as conn:
            return migrate(conn, self.schema)

    # --- enqueueing ---------------------------------------------------------

    def add_job(
        self,
        identifier: str | Task,
        payload: Any = None,
        *,
        queue_name: str | None = None,
        run_at: datetime | None = None,
        max_attempts: int | None = None,
        job_key: str | None = None,
        job_key_mode: str | None = None,
        priority: int | None = None,
        flags: Sequence[str] | None = None,
    ) -> Job:
        """Add one job (or replace/update the job holding ``job_key``) and return it.

        ``job_key_mode`` is ``replace`` (default), ``preserve_run_at`` or
        ``unsafe_dedupe``, with graphile-worker's semantics. ``identifier`` may
        be a declared :class:`~kongtask.Task`: its defaults fill what is not given.
        """
        spec = job_spec_for(
            identifier,
            payload,
            queue_name=queue_name,
            run_at=run_at,
            max_attempts=max_attempts,
            job_key=job_key,
            job_key_mode=job_key_mode,
            priority=priority,
            flags=flags,
        )
        with self.connection() as conn:
            return add_job_on(conn, self._queries, spec)

    def add_jobs(
        self,
        specs: Iterable[JobSpec | Mapping[str, Any]],
        *,
        job_key_preserve_run_at: bool = False,
    ) -> list[Job]:
        """Add many jobs in one statement and return them in input order.

        ``job_key_mode`` is not allowed per spec here (graphile-worker's
        ``add_jobs`` has one mode for the call: replace, or preserve_run_at when
        ``job_key_preserve_run_at`` is true).
        """
        with self.connection() as conn:
            return add_jobs_on(
                conn, self._queries, specs, job_key_preserve_run_at=job_key_preserve_run_at
            )

    def remove_job(self, job_key: str) -> Job | None:
        """Delete the unlocked job holding ``job_key``.

        A locked job can't be deleted: it loses its key and will not be
        retried. Returns the affected job, or ``None`` if no job had the key.
        """
        JobSpec("remove_job", job_key=job_key)  # validates the key
        jobs = self._jobs(self._queries.remove_job, {"job_key": job_key})
        return jobs[0] if jobs else None

    # --- administration -----------------------------------------------------

    def complete_jobs(self, ids: Iterable[int]) -> list[Job]:
        """Mark jobs done (delete them); locked jobs are skipped unless their lock is stale."""
        return self._jobs(self._queries.complete_jobs_admin, {"ids": _job_ids(ids)})

    def permanently_fail_jobs(self, ids: Iterable[int], reason: str | None = None) -> list[Job]:
        """Fail jobs for good (attempts = max_attempts) with ``reason`` as their last error."""
        if reason is not None and not isinstance(reason, str):
            raise InvalidJobError("reason must be a string or None", field="reason", value=reason)
        params = {"ids": _job_ids(ids), "reason": reason}
        return self._jobs(self._queries.permanently_fail_jobs, params)

    def cancel_job(self, job_id: int, reason: str | None = None) -> CancelResult:
        """Cancel one job: a waiting job fails for good at once (``last_error``
        ``cancelled`` or ``cancelled: <reason>``, attempts used up); a running one is
        signalled to the kongtask pool holding it, which sets its abort event and
        fails it for good when its handler ends (a Node worker ignores the signal).

        The result says which happened (``cancelled``, ``signalled``), or that
        there is no such job (``missing``: it may have completed) or that it had
        already failed for good (``finished``). On a borrowed connection the
        change and the signal take effect when the caller commits.
        """
        params = cancel_params(job_id, reason, self.schema)
        with self.connection() as conn:
            return cancel_result(job_id, conn.execute(self._queries.cancel_job, params).fetchone())

    def reschedule_jobs(
        self,
        ids: Iterable[int],
        *,
        run_at: datetime | None = None,
        priority: int | None = None,
        attempts: int | None = None,
        max_attempts: int | None = None,
    ) -> list[Job]:
        """Change when and how unlocked jobs run; ``None`` leaves a column as it is.

        Zero is a value here (``attempts=0`` resets the attempt count), unlike
        graphile-worker's JavaScript helper where 0 means "unchanged".
        """
        JobSpec("reschedule_jobs", run_at=run_at, priority=priority)
        if attempts is not None and (
            isinstance(attempts, bool)
            or not isinstance(attempts, int)
            or not 0 <= attempts <= 32767
        ):
            raise InvalidJobError(
                f"attempts must be an integer between 0 and 32767, got {attempts!r}",
                field="attempts",
                value=attempts,
            )
        if max_attempts is not None:
            JobSpec("reschedule_jobs", max_attempts=max_attempts)
        params = {
            "ids": _job_ids(ids),
            "run_at": run_at,
            "priority": priority,
            "attempts": attempts,
            "max_attempts": max_attempts,
        }
        return self._jobs(self._queries.reschedule_jobs, params)

    def force_unlock_workers(self, worker_ids: Iterable[str]) -> None:
        """Release every job and queue locked by these pool ids (workers known to be dead)."""
        if isinstance(worker_ids, str):
            raise InvalidJobError(
                "worker_ids must be a list of pool ids, not a single string",
                field="worker_ids",
                value=worker_ids,
            )
        ids = list(worker_ids)
        for worker_id in ids:
            if not isinstance(worker_id, str) or not worker_id:
                raise InvalidJobError(
                    f"worker_ids must hold non-empty strings, got {worker_id!r}",
                    field="worker_ids",
                    value=worker_id,
                )
        with self.connection() as conn:
            conn.execute(self._queries.force_unlock_workers, {"worker_ids": ids})

    def cleanup(
        self,
        tasks: Iterable[str] = ("GC_JOB_QUEUES",),
        task_identifiers_to_keep: Iterable[str] = (),
    ) -> dict[str, int]:
        """Run cleanup tasks in order; returns how many rows each removed.

        ``GC_TASK_IDENTIFIERS`` is unsafe while workers run (they cache task
        ids), as in graphile-worker.
        """
        names = [tasks] if isinstance(tasks, str) else list(tasks)
        invalid = [name for name in names if name not in CLEANUP_TASKS]
        if invalid or not names:
            raise ConfigurationError(
                "Invalid cleanup tasks; allowed values: "
                + ", ".join(f"'{name}'" for name in CLEANUP_TASKS)
                + "; you provided: "
                + ", ".join(f"'{name}'" for name in names),
                name="tasks",
                value=names,
            )
        keep = (
            [task_identifiers_to_keep]
            if isinstance(task_identifiers_to_keep, str)
            else list(task_identifiers_to_keep)
        )
        statements = {
            "GC_TASK_IDENTIFIERS": self._queries.cleanup_gc_task_identifiers,
            "GC_JOB_QUEUES": self._queries.cleanup_gc_job_queues,
            "DELETE_PERMAFAILED_JOBS": self._queries.cleanup_delete_permafailed_jobs,
        }
        removed: dict[str, int] = {}
        with self.connection() as conn:
            for name in names:
                cursor = conn.execute(statements[name], {"keep": keep})
                removed[name] = cursor.rowcount
        return removed

    # --- inspection (kongtask status / jobs, the dashboard) --------------------

    def status(self, *, cron_items: Sequence[ParsedCronItem] = ()) -> StatusReport:
        """Job counts per task, named queue and pool; locked queues, live pools, cron.

        ``cron_items`` (a parsed crontab) adds each item's spec and next firing;
        stored cron items are always included.
        """
        with self.connection() as conn:
            # Stored items (``kongtask cron add``) are part of every cron node's schedule.
            given = {item.identifier for item in cron_items}
            stored = [
                stored.item
                for stored in cron_store.list_stored_items(conn, self._queries)
                if stored.item.identifier not in given
            ]
            return ops.status(conn, self._queries, cron_items=[*cron_items, *stored])

    def list_jobs(
        self,
        *,
        task: str | None = None,
        queue: str | None = None,
        state: str | None = None,
        limit: int = 100,
    ) -> list[JobInfo]:
        """Jobs matching the filters (``state`` one of ``kongtask.ops.status.JOB_STATES``)."""
        with self.connection() as conn:
            return ops.list_jobs(
                conn, self._queries, task=task, queue=queue, state=state, limit=limit
            )

    def get_job(self, job_id: int) -> JobInfo | None:
        """One job with its queue, state and timing, or ``None`` if it does not exist."""
        with self.connection() as conn:
            return ops.get_job(conn, self._queries, job_id)

    def retry_jobs(self, ids: Iterable[int]) -> list[Job]:
        """Run these jobs now (a permanently failed one gets one more attempt)."""
        with self.connection() as conn:
            return ops.retry_jobs(conn, self._queries, ids)

    def list_pools(self, *, live_only: bool = False) -> list[PoolInfo]:
        """kongtask pools from their heartbeat rows (``live`` within 60 s)."""
        with self.connection() as conn:
            return ops.list_pools(conn, self._queries, live_only=live_only)

    # --- fleet-wide limits and pauses (kongtask's own tables; Node ignores them) ----

    def set_limit(
        self,
        task: str | None = None,
        *,
        queue: str | None = None,
        flag: str | None = None,
        concurrency: int | None = None,
        rate: str | tuple[int, float] | None = None,
    ) -> LimitInfo:
        """Limit one key (a task, ``queue=`` or ``flag=``) across every kongtask pool:
        at most ``concurrency`` jobs at once and/or ``rate`` starts (``"10/s"``,
        ``"5/m"``, ``"100/h"`` or ``(count, seconds)``). Pools apply it within ~2 s."""
        with self.connection() as conn:
            return fleet.set_limit(
                conn,
                self._queries,
                task,
                queue=queue,
                flag=flag,
                concurrency=concurrency,
                rate=rate,
            )

    def clear_limit(
        self, task: str | None = None, *, queue: str | None = None, flag: str | None = None
    ) -> bool:
        """Remove the limit on one key; False if there was none."""
        with self.connection() as conn:
            return fleet.clear_limit(conn, self._queries, task, queue=queue, flag=flag)

    def list_limits(self) -> list[LimitInfo]:
        """Every limit, with how many jobs of its key are locked now."""
        with self.connection() as conn:
            return fleet.list_limits(conn, self._queries)

    def pause(
        self, task: str | None = None, *, queue: str | None = None, by: str | None = None
    ) -> PauseInfo:
        """Pause a task or ``queue=`` on every kongtask pool: its jobs stay queued,
        running ones finish. ``by`` names who paused (default ``user@host/pid``)."""
        with self.connection() as conn:
            return fleet.pause(conn, self._queries, task, queue=queue, by=by)

    def resume(self, task: str | None = None, *, queue: str | None = None) -> bool:
        """Resume a paused task or queue; False if it was not paused."""
        with self.connection() as conn:
            return fleet.resume(conn, self._queries, task, queue=queue)

    def list_pauses(self) -> list[PauseInfo]:
        """Every paused task and queue, with who paused it and when."""
        with self.connection() as conn:
            return fleet.list_pauses(conn, self._queries)

    # --- stored cron items and the cron history (kongtask's own tables) -----------

    def add_cron_item(self, item: Any) -> StoredCronItem:
        """Store a cron item (a crontab line, a ``CronItem`` or a mapping) that every
        kongtask cron node on this schema schedules within seconds, surviving restarts.

        Raises ``ConfigurationError`` if a stored item has that identifier already.
        """
        with self.connection() as conn:
            return cron_store.add_stored_item(conn, self._queries, item)

    def update_cron_item(self, item: Any) -> StoredCronItem:
        """Replace the stored cron item with the same identifier."""
        with self.connection() as conn:
            return cron_store.update_stored_item(conn, self._queries, item)

    def remove_cron_item(self, identifier: str) -> bool:
        """Remove a stored cron item; False if there was none with that identifier."""
        with self.connection() as conn:
            return cron_store.remove_stored_item(conn, self._queries, identifier)

    def list_cron_items(self) -> list[StoredCronItem]:
        """The stored cron items, by identifier (each with its line and parsed item)."""
        with self.connection() as conn:
            return cron_store.list_stored_items(conn, self._queries)

    def cron_history(
        self,
        identifier: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
    ) -> list[CronRun]:
        """Cron firings recorded by kongtask nodes, newest first, with their outcomes."""
        with self.connection() as conn:
            return cron_store.cron_history(
                conn, self._queries, identifier=identifier, since=since, until=until, limit=limit
            )


def add_job(
    identifier: str | Task,
    payload: Any = None,
    *,
    connection: psycopg.Connection[Any] | None = None,
    connection_string: str | None = None,
    schema: str | None = None,
    **spec: Any,
) -> Job:
    """Add one job; on ``connection`` inside its current transaction, else on its own.

    With ``connection`` (a ``psycopg.Connection``) the job is inserted in the
    caller's transaction: rolled back, it never existed; committed, it is
    claimed at once. kongtask neither commits nor closes that connection.
    Without it a connection is opened and closed for this call alone
    (convenient for scripts; a long-lived process should keep a
    ``WorkerUtils``).
    """
    if connection is not None:
        check_connection(connection, connection_string)
        queries = Queries(resolve_schema(schema))
        return add_job_on(connection, queries, job_spec_for(identifier, payload, **spec))
    with WorkerUtils(connection_string, schema=schema) as utils:
        return utils.add_job(identifier, payload, **spec)


def add_jobs(
    specs: Iterable[JobSpec | Mapping[str, Any]],
    *,
    connection: psycopg.Connection[Any] | None = None,
    connection_string: str | None = None,
    schema: str | None = None,
    job_key_preserve_run_at: bool = False,
) -> list[Job]:
    """Add many jobs in one statement; on ``connection`` inside its transaction, as ``add_job``."""
    if connection is not None:
        check_connection(connection, connection_string)
        return add_jobs_on(
            connection,
            Queries(resolve_schema(schema)),
            specs,
            job_key_preserve_run_at=job_key_preserve_run_at,
        )
    with WorkerUtils(connection_string, schema=schema) as utils:
        return utils.add_jobs(specs, job_key_preserve_run_at=job_key_preserve_run_at)


async def add_job_async(
    identifier: str | Task,
    payload: Any = None,
    *,
    connection: psycopg.AsyncConnection[Any],
    schema: str | None = None,
    **spec: Any,
) -> Job:
    """Add one job on an ``AsyncConnection``, inside its current transaction.

    As :func:`add_job` with ``connection``: kongtask never commits or closes
    it, so the job exists only if the caller's transaction commits.
    """
    check_async_connection(connection)
    queries = Queries(resolve_schema(schema))
    return await add_job_on_async(connection, queries, job_spec_for(identifier, payload, **spec))


async def add_jobs_async(
    specs: Iterable[JobSpec | Mapping[str, Any]],
    *,
    connection: psycopg.AsyncConnection[Any],
    schema: str | None = None,
    job_key_preserve_run_at: bool = False,
) -> list[Job]:
    """Add many jobs on an ``AsyncConnection`` in one statement, inside its transaction."""
    check_async_connection(connection)
    return await add_jobs_on_async(
        connection,
        Queries(resolve_schema(schema)),
        specs,
        job_key_preserve_run_at=job_key_preserve_run_at,
    )


def cancel_job(
    job_id: int,
    reason: str | None = None,
    *,
    connection: psycopg.Connection[Any] | None = None,
    connection_string: str | None = None,
    schema: str | None = None,
) -> CancelResult:
    """Cancel one job, as :meth:`WorkerUtils.cancel_job`; on ``connection`` inside its
    transaction (the change and the running job's signal take effect at its commit)."""
    if connection is None:
        with WorkerUtils(connection_string, schema=schema) as utils:
            return utils.cancel_job(job_id, reason)
    check_connection(connection, connection_string)
    queries = Queries(resolve_schema(schema))
    params = cancel_params(job_id, reason, queries.schema)
    # Tuples whatever row factory the caller's connection has.
    with connection.cursor(row_factory=tuple_row) as cursor:
        return cancel_result(job_id, cursor.execute(queries.cancel_job, params).fetchone())


async def cancel_job_async(
    job_id: int,
    reason: str | None = None,
    *,
    connection: psycopg.AsyncConnection[Any],
    schema: str | None = None,
) -> CancelResult:
    """:func:`cancel_job` on an ``AsyncConnection``, inside its current transaction: a
    waiting job fails for good, a running one is signalled to its pool, at commit."""
    check_async_connection(connection)
    queries = Queries(resolve_schema(schema))
    params = cancel_params(job_id, reason, queries.schema)
    async with connection.cursor(row_factory=tuple_row) as cursor:
        await cursor.execute(queries.cancel_job, params)
        return cancel_result(job_id, await cursor.fetchone())


def _job_ids(ids: Iterable[int]) -> list[int]:
    if isinstance(ids, str | bytes) or not isinstance(ids, Iterable):
        raise InvalidJobError("ids must be a list of job ids", field="ids", value=ids)
    result = list(ids)
    for job_id in result:
        if isinstance(job_id, bool) or not isinstance(job_id, int):
            raise InvalidJobError(
                f"ids must hold integer job ids, got {job_id!r}", field="ids", value=job_id
            )
    return result
