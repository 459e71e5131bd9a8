"""Adding jobs over a given connection: the one implementation behind every ``add_job``.

``WorkerUtils``, ``Runner`` and a handler's ``helpers`` only differ in where
their connection comes from; validation, the statements and the handling of
graphile-worker's quirks live here once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

import psycopg
from psycopg.rows import tuple_row

from kongtask.db.statements import Queries
from kongtask.errors import ConfigurationError, InvalidJobError, KongtaskError
from kongtask.job import Job
from kongtask.job_spec import JobSpec
from kongtask.jobs.bulk import BULK_MIN_SPECS, add_bulk_on, add_bulk_on_async, needs_transaction

__all__ = [
    "EnqueueObserver",
    "add_job_on",
    "add_job_on_async",
    "add_job_specs_on",
    "add_jobs_on",
    "add_jobs_on_async",
    "check_async_connection",
    "check_connection",
    "jobs_from_query",
    "jobs_from_query_async",
    "set_enqueue_observer",
]

logger = logging.getLogger(__name__)

# add_job can return an all-NULL row when a concurrent worker locked the keyed
# job between the function's eviction step and its upsert (graphile-worker
# #580); a retry evicts the locked job and inserts a new one.
_ADD_JOB_RACE_RETRIES = 5


class EnqueueObserver(Protocol):
    """Watches every ``add_job``/``add_jobs`` call (tracing installs one; none by default).

    ``start`` gets the checked specs before the database is touched and returns
    the specs to add (it may add flags) and a token; ``end`` gets that token and
    the added jobs, or the error the call raised.
    """

    def start(self, operation: str, specs: list[JobSpec]) -> tuple[list[JobSpec], object]:
        """Called before the statement; returns the specs to add and a token for ``end``."""
        ...

    def end(self, token: object, jobs: list[Job] | None, error: BaseException | None) -> None:
        """Called after the statement with its jobs, or with the error it raised."""
        ...


_observer: EnqueueObserver | None = None


def set_enqueue_observer(observer: EnqueueObserver | None) -> EnqueueObserver | None:
    """Install ``observer`` for every enqueue in this process (``None`` removes it).

    Returns the previous observer. Without one, enqueueing pays a single global
    lookup per call.
    """
    global _observer
    previous, _observer = _observer, observer
    return previous


def _observed(
    observer: EnqueueObserver,
    operation: str,
    specs: list[JobSpec],
    add: Callable[[list[JobSpec]], list[Job]],
) -> list[Job]:
    specs, token = observer.start(operation, specs)
    try:
        jobs = add(specs)
    except BaseException as error:
        observer.end(token, None, error)
        raise
    observer.end(token, jobs, None)
    return jobs


def jobs_from_query(
    conn: psycopg.Connection[Any], queries: Queries, query: Any, params: Mapping[str, Any]
) -> list[Job]:
    """Run a statement returning ``job_columns`` rows and build ``Job`` records.

    Rows of all NULLs (what the SQL functions return for "nothing") are
    skipped. A task row created by the very statement that returned the job is
    invisible to that statement's join, so such identifiers are looked up
    afterwards, in a second (rarely needed) round trip. The cursor always
    yields tuples, whatever row factory a borrowed connection was given.
    """
    with conn.cursor(row_factory=tuple_row) as cursor:
        rows = _found(cursor.execute(query, params).fetchall())
        return _named_jobs(cursor, queries, rows)


def _named_jobs(
    cursor: psycopg.Cursor[tuple[Any, ...]], queries: Queries, rows: list[tuple[Any, ...]]
) -> list[Job]:
    """``Job`` records for found rows, looking up the task names a join could not see."""
    missing = _missing_task_ids(rows)
    names: dict[int, str] = {}
    if missing:
        names = dict(cursor.execute(queries.task_identifiers, {"ids": missing}).fetchall())
    return _jobs_from_rows(rows, names)


async def jobs_from_query_async(
    conn: psycopg.AsyncConnection[Any], queries: Queries, query: Any, params: Mapping[str, Any]
) -> list[Job]:
    """:func:`jobs_from_query` over an ``AsyncConnection``."""
    async with conn.cursor(row_factory=tuple_row) as cursor:
        rows = _found(await (await cursor.execute(query, params)).fetchall())
        missing = _missing_task_ids(rows)
        names: dict[int, str] = {}
        if missing:
            await cursor.execute(queries.task_identifiers, {"ids": missing})
            names = dict(await cursor.fetchall())
    return _jobs_from_rows(rows, names)


def _found(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return [row for row in rows if row[0] is not None]


def _missing_task_ids(rows: list[tuple[Any, ...]]) -> list[int]:
    return sorted({row[2] for row in rows if row[3] is None})


def _jobs_from_rows(rows: list[tuple[Any, ...]], names: Mapping[int, str]) -> list[Job]:
    """Build ``Job`` records; payloads arrive as text and are decoded by one ``json.loads``."""
    if not rows:
        return []
    payloads = json.loads("[" + ",".join(row[4] for row in rows) + "]")
    make = Job.from_values
    return [
        make(
            (row[0], row[1], row[2], names[row[2]] if row[3] is None else row[3], payload, *row[5:])
        )
        for row, payload in zip(rows, payloads, strict=True)
    ]


def add_job_on(conn: psycopg.Connection[Any], queries: Queries, spec: JobSpec) -> Job:
    """Add one job (or update the job holding its key) through the schema's ``add_job``."""
    observer = _observer
    if observer is not None:
        return _observed(
            observer, "add_job", [spec], lambda specs: [_add_job_on(conn, queries, specs[0])]
        )[0]
    return _add_job_on(conn, queries, spec)


def _add_job_on(conn: psycopg.Connection[Any], queries: Queries, spec: JobSpec) -> Job:
    params = _add_job_params(spec)
    for _ in range(_ADD_JOB_RACE_RETRIES):
        jobs = jobs_from_query(conn, queries, queries.add_job, params)
        if jobs:
            return jobs[0]
        logger.debug("add_job lost a race on job_key %r; retrying", spec.job_key)
    raise _lost_race(spec)


async def add_job_on_async(
    conn: psycopg.AsyncConnection[Any], queries: Queries, spec: JobSpec
) -> Job:
    """:func:`add_job_on` over an ``AsyncConnection``."""
    observer = _observer
    if observer is None:
        return await _add_job_on_async(conn, queries, spec)
    (spec,), token = observer.start("add_job", [spec])
    try:
        job = await _add_job_on_async(conn, queries, spec)
    except BaseException as error:
        observer.end(token, None, error)
        raise
    observer.end(token, [job], None)
    return job


async def _add_job_on_async(
    conn: psycopg.AsyncConnection[Any], queries: Queries, spec: JobSpec
) -> Job:
    params = _add_job_params(spec)
    for _ in range(_ADD_JOB_RACE_RETRIES):
        jobs = await jobs_from_query_async(conn, queries, queries.add_job, params)
        if jobs:
            return jobs[0]
        logger.debug("add_job lost a race on job_key %r; retrying", spec.job_key)
    raise _lost_race(spec)


def _add_job_params(spec: JobSpec) -> dict[str, Any]:
    return {
        "identifier": spec.identifier,
        "payload": spec.payload_json,
        "queue_name": spec.queue_name,
        "run_at": spec.run_at,
        "max_attempts": spec.max_attempts,
        "job_key": spec.job_key,
        "priority": spec.priority,
        "flags": list(spec.flags) if spec.flags is not None else None,
        "job_key_mode": spec.job_key_mode,
    }


def _lost_race(spec: JobSpec) -> KongtaskError:
    return KongtaskError(
        f"add_job could not add job with job_key {spec.job_key!r}: the keyed job "
        f"was locked concurrently {_ADD_JOB_RACE_RETRIES} times"
    )


def add_jobs_on(
    conn: psycopg.Connection[Any],
    queries: Queries,
    specs: Iterable[JobSpec | Mapping[str, Any]],
    *,
    job_key_preserve_run_at: bool = False,
) -> list[Job]:
    """Add many jobs in one ``add_jobs`` statement; returns them in input order.

    ``job_key_mode`` is not allowed per spec (graphile-worker's ``add_jobs``
    has one mode for the call: replace, or preserve_run_at when
    ``job_key_preserve_run_at`` is true), and one key may appear only once.
    Everything is checked before the database is touched.
    """
    checked = _checked_batch(specs, job_key_preserve_run_at)
    if not checked:
        return []
    observer = _observer
    if observer is not None:
        return _observed(
            observer,
            "add_jobs",
            checked,
            lambda specs: _add_checked_on(conn, queries, specs, job_key_preserve_run_at),
        )
    return _add_checked_on(conn, queries, checked, job_key_preserve_run_at)


def _add_checked_on(
    conn: psycopg.Connection[Any],
    queries: Queries,
    checked: list[JobSpec],
    job_key_preserve_run_at: bool,
) -> list[Job]:
    """Keyless specs through the bulk path when there are enough, keyed ones through
    the schema's ``add_jobs``, both in one transaction; jobs in input order."""
    plain, keyed = _split(checked)
    if len(plain) < BULK_MIN_SPECS:
        return jobs_from_query(
            conn, queries, queries.add_jobs, _add_jobs_params(checked, job_key_preserve_run_at)
        )
    if not keyed:
        return add_bulk_on(conn, queries, checked)
    with _atomic(conn):
        added = add_bulk_on(conn, queries, [checked[i] for i in plain])
        params = _add_jobs_params([checked[i] for i in keyed], job_key_preserve_run_at)
        by_key = jobs_from_query(conn, queries, queries.add_jobs, params)
    return _in_order(checked, plain, added, by_key)


async def add_jobs_on_async(
    conn: psycopg.AsyncConnection[Any],
    queries: Queries,
    specs: Iterable[JobSpec | Mapping[str, Any]],
    *,
    job_key_preserve_run_at: bool = False,
) -> list[Job]:
    """:func:`add_jobs_on` over an ``AsyncConnection``."""
    checked = _checked_batch(specs, job_key_preserve_run_at)
    if not checked:
        return []
    observer = _observer
    token: object = None
    if observer is not None:
        checked, token = observer.start("add_jobs", checked)
    try:
        jobs = await _add_checked_on_async(conn, queries, checked, job_key_preserve_run_at)
    except BaseException as error:
        if observer is not None:
            observer.end(token, None, error)
        raise
    if observer is not None:
        observer.end(token, jobs, None)
    return jobs


async def _add_checked_on_async(
    conn: psycopg.AsyncConnection[Any],
    queries: Queries,
    checked: list[JobSpec],
    job_key_preserve_run_at: bool,
) -> list[Job]:
    """:func:`_add_checked_on` over an ``AsyncConnection``."""
    plain, keyed = _split(checked)
    if len(plain) < BULK_MIN_SPECS:
        return await jobs_from_query_async(
            conn, queries, queries.add_jobs, _add_jobs_params(checked, job_key_preserve_run_at)
        )
    if not keyed:
        return await add_bulk_on_async(conn, queries, checked)
    async with conn.transaction() if needs_transaction(conn) else nullcontext():
        added = await add_bulk_on_async(conn, queries, [checked[i] for i in plain])
        params = _add_jobs_params([checked[i] for i in keyed], job_key_preserve_run_at)
        by_key = await jobs_from_query_async(conn, queries, queries.add_jobs, params)
    return _in_order(checked, plain, added, by_key)


def _split(checked: Sequence[JobSpec]) -> tuple[list[int], list[int]]:
    """The positions of the keyless specs and of the keyed ones."""
    plain = [index for index, spec in enumerate(checked) if spec.job_key is None]
    if len(plain) == len(checked):
        return plain, []
    return plain, [index for index, spec in enumerate(checked) if spec.job_key is not None]


def _atomic(conn: psycopg.Connection[Any]) -> AbstractContextManager[Any]:
    """A transaction around several statements, unless the caller already holds one."""
    if needs_transaction(conn):
        return conn.transaction()
    return nullcontext()


def _in_order(
    checked: Sequence[JobSpec], plain: Sequence[int], added: Sequence[Job], keyed: Sequence[Job]
) -> list[Job]:
    """Bulk jobs and keyed jobs back in input order.

    Keyed jobs are matched by key: the schema's ``add_jobs`` returns no row
    for a key whose job a worker locked meanwhile, as it always has.
    """
    jobs: list[Job | None] = [None] * len(checked)
    for index, job in zip(plain, added, strict=True):
        jobs[index] = job
    by_key = {job.key: job for job in keyed}
    for index, spec in enumerate(checked):
        if spec.job_key is not None:
            jobs[index] = by_key.get(spec.job_key)
    return [job for job in jobs if job is not None]


def _add_jobs_params(checked: list[JobSpec], job_key_preserve_run_at: bool) -> dict[str, Any]:
    """The ``add_jobs`` parameters for a checked batch."""
    return {
        "specs": "[" + ",".join([spec.json_spec_text() for spec in checked]) + "]",
        "preserve_run_at": job_key_preserve_run_at,
    }


def _checked_batch(
    specs: Iterable[JobSpec | Mapping[str, Any]], job_key_preserve_run_at: bool
) -> list[JobSpec]:
    """Check a batch of specs for ``add_jobs`` (keys unique, no per-spec mode)."""
    if not isinstance(job_key_preserve_run_at, bool):
        raise InvalidJobError(
            "job_key_preserve_run_at must be a bool",
            field="job_key_preserve_run_at",
            value=job_key_preserve_run_at,
        )
    checked = [JobSpec.coerce(spec, index) for index, spec in enumerate(specs)]
    keys: set[str] = set()
    for index, spec in enumerate(checked):
        if spec.job_key_mode is not None:
            raise InvalidJobError(
                f"job spec at index {index} sets job_key_mode (a declared task's applies "
                "to its keyed jobs); add_jobs takes job_key_preserve_run_at for the whole "
                "call instead",
                field="job_key_mode",
                value=spec.job_key_mode,
            )
        if spec.job_key is not None:
            if spec.job_key in keys:
                raise InvalidJobError(
                    f"job_key {spec.job_key!r} appears more than once in one add_jobs "
                    f"call (again at index {index})",
                    field="job_key",
                    value=spec.job_key,
                )
            keys.add(spec.job_key)
    return checked


def check_connection(connection: object, connection_string: object = None) -> None:
    """Refuse anything but a ``psycopg.Connection`` (and a second way to connect beside it)."""
    if isinstance(connection, psycopg.AsyncConnection):
        raise ConfigurationError(
            "connection is a psycopg.AsyncConnection; use kongtask.add_job_async / "
            "add_jobs_async / cancel_job_async (or a declared task's defer_async) with it",
            name="connection",
            value=connection,
        )
    if not isinstance(connection, psycopg.Connection):
        raise ConfigurationError(
            "connection must be a psycopg.Connection (for SQLAlchemy: "
            "session.connection().connection.driver_connection)",
            name="connection",
            value=connection,
        )
    if connection_string is not None:
        raise ConfigurationError(
            "give either connection_string or connection=, not both", name="connection"
        )


def check_async_connection(connection: object) -> None:
    """Refuse anything but a ``psycopg.AsyncConnection`` for the async enqueue calls."""
    if not isinstance(connection, psycopg.AsyncConnection):
        raise ConfigurationError(
            "connection must be a psycopg.AsyncConnection",
            name="connection",
            value=connection,
        )


def add_job_specs_on(
    conn: psycopg.Connection[Any],
    queries: Queries,
    specs: Sequence[JobSpec],
    *,
    operation: str = "add_jobs",
) -> list[Job]:
    """Add each spec as its own ``add_job`` call would; returns the jobs in input order.

    For a caller that adds many jobs inside a transaction it holds (the cron
    writer records its firings in the same one). Specs without a job key go in
    one ``add_jobs`` statement (one NOTIFY for all of them); keyed specs go in
    one statement calling ``add_job`` for each in order, with each spec's own
    ``job_key_mode``, so a later spec replaces the job an earlier one with the
    same key just added. A keyed job that lost a race on a locked key is added
    again alone, as :func:`add_job_on` does. An enqueue observer (tracing)
    sees the call as ``operation``.
    """
    checked = [_checked_spec(spec, index) for index, spec in enumerate(specs)]
    observer = _observer
    if observer is not None and checked:
        return _observed(
            observer, operation, checked, lambda specs: _add_job_specs_on(conn, queries, specs)
        )
    return _add_job_specs_on(conn, queries, checked)


def _add_job_specs_on(
    conn: psycopg.Connection[Any], queries: Queries, checked: list[JobSpec]
) -> list[Job]:
    jobs: list[Job | None] = [None] * len(checked)
    plain = [index for index, spec in enumerate(checked) if spec.job_key is None]
    keyed = [index for index, spec in enumerate(checked) if spec.job_key is not None]
    if plain:
        plain_specs = [checked[i] for i in plain]
        if len(plain) >= BULK_MIN_SPECS:
            added = add_bulk_on(conn, queries, plain_specs)
        else:
            params = _add_jobs_params(plain_specs, False)
            added = jobs_from_query(conn, queries, queries.add_jobs, params)
        for index, job in zip(plain, added, strict=True):
            jobs[index] = job
    if keyed:
        specs_text = "[" + ",".join([_keyed_spec_text(checked[i]) for i in keyed]) + "]"
        with conn.cursor(row_factory=tuple_row) as cursor:
            rows = cursor.execute(queries.add_jobs_each, {"specs": specs_text}).fetchall()
            placed = [(i, row) for i, row in zip(keyed, rows, strict=True) if row[0] is not None]
            named = _named_jobs(cursor, queries, [row for _, row in placed])
        for (index, _), job in zip(placed, named, strict=True):
            jobs[index] = job
        for index in keyed:
            if jobs[index] is None:
                logger.debug("add_job lost a race on job_key %r; retrying", checked[index].job_key)
                jobs[index] = add_job_on(conn, queries, checked[index])
    return [job for job in jobs if job is not None]


def _checked_spec(spec: object, index: int) -> JobSpec:
    if not isinstance(spec, JobSpec):
        raise InvalidJobError(
            f"job spec at index {index} must be a JobSpec, got {type(spec).__name__}",
            field="specs",
            value=spec,
        )
    return spec


def _keyed_spec_text(spec: JobSpec) -> str:
    """``json_spec_text`` plus the spec's ``job_key_mode`` (``add_jobs_each`` takes one per job)."""
    text = spec.json_spec_text()
    if spec.job_key_mode is None:
        return text
    return f'{text[:-1]},"job_key_mode":{json.dumps(spec.job_key_mode)}}}'
