"""The bulk path of ``add_jobs``: jobs without a job key, copied in with binary ``COPY``.

The schema's ``add_jobs`` function takes the batch as one JSON document that
the database parses, unpacks into ``job_spec`` records and joins against the
task and queue tables; for a large batch that is most of the cost on both
sides of the wire. Jobs without a key need none of its upsert logic, so for
them kongtask writes the same rows more directly:

1. ``bulk_add_prepare`` looks up the ids of the batch's (few) distinct task
   identifiers and queue names and the transaction's ``now()``, takes the job
   ids from the table's own identity sequence, and sends the batch's single
   ``jobs:insert`` notification with the payload ``add_jobs`` sends, so Node
   and kongtask workers wake;
2. only if a task or queue row was missing: ``bulk_add_missing`` creates it
   (as ``add_jobs`` does) and ``bulk_add_targets`` looks the ids up again, in
   new statements that see rows a concurrent transaction committed meanwhile;
3. ``bulk_add_copy`` streams the rows in binary ``COPY`` format.

All of it runs in one transaction (the caller's, or one opened here), so the
defaults the table fills in (``created_at``, ``updated_at``) equal the
``now()`` read in step 1, and the returned :class:`~kongtask.Job` records are
built from what was written, with no rows sent back. The rows are those the
schema's ``add_jobs`` would write for the same specs: payload ``{}`` unless
given, ``run_at`` now, 25 attempts, priority 0, flags as ``{flag: true}``
(``None`` for no flags). Keyed specs keep the exact path (the schema's
``add_jobs``), and so do batches of fewer than ``BULK_MIN_SPECS``, where the
one statement of the schema's ``add_jobs`` beats the bulk path's round trips.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import nullcontext
from datetime import datetime
from functools import lru_cache
from typing import Any

import psycopg
from psycopg.rows import tuple_row

from kongtask.db.statements import Queries
from kongtask.errors import KongtaskError
from kongtask.job import Job
from kongtask.job_spec import JobSpec

__all__ = ["BULK_MIN_SPECS", "add_bulk_on", "add_bulk_on_async", "needs_transaction"]

#: Below this many keyless specs one ``add_jobs`` statement is quicker than the
#: bulk path's two or three round trips (measured on a local server, fresh
#: table, per call: 8 specs 0.9 ms against 1.3 ms; 16 specs about even;
#: 64 specs 2.7 ms against 1.9 ms).
BULK_MIN_SPECS = 16

_DEFAULT_MAX_ATTEMPTS = 25
_DEFAULT_PRIORITY = 0
# The flags column travels as bytes already in jsonb's binary form (see
# _flags_field): psycopg's jsonb dumper would encode each dict in Python.
_COPY_TYPES = ["int8", "int4", "int4", "text", "timestamptz", "int2", "int2", "bytea"]
_JSONB_BINARY_VERSION = b"\x01"
_COPY_TYPES_PLAIN = ["int8", "int4", "text"]


class _Batch:
    """The distinct task identifiers and queue names of a batch, and each spec's place in them."""

    def __init__(self, specs: Sequence[JobSpec]) -> None:
        self.specs = specs
        tasks: dict[str, int] = {}
        queues: dict[str, int] = {}
        self.task_index = [tasks.setdefault(spec.identifier, len(tasks)) for spec in specs]
        self.queue_index = [
            None if spec.queue_name is None else queues.setdefault(spec.queue_name, len(queues))
            for spec in specs
        ]
        self.targets_params = {"identifiers": list(tasks), "queue_names": list(queues)}
        #: Whether every spec leaves queue, run_at, max_attempts, priority and flags unset.
        self.plain = not queues and all(
            spec.run_at is None
            and spec.max_attempts is None
            and spec.priority is None
            and not spec.flags
            for spec in specs
        )

    @property
    def copy_types(self) -> list[str]:
        """The types of the COPY columns, in order."""
        return _COPY_TYPES_PLAIN if self.plain else _COPY_TYPES

    def copy_statement(self, queries: Queries) -> Any:
        """``bulk_add_copy``, or its three-column form for a plain batch."""
        return queries.bulk_add_copy_plain if self.plain else queries.bulk_add_copy

    def missing_params(self, task_ids: list[int | None], queue_ids: list[int | None]) -> Any:
        """``bulk_add_missing`` parameters for the rows not found, or None if all were."""
        identifiers = self.targets_params["identifiers"]
        queue_names = self.targets_params["queue_names"]
        missing_tasks = [
            name for name, found in zip(identifiers, task_ids, strict=True) if not found
        ]
        missing_queues = [
            name for name, found in zip(queue_names, queue_ids, strict=True) if not found
        ]
        if not missing_tasks and not missing_queues:
            return None
        return {"identifiers": sorted(missing_tasks), "queue_names": sorted(missing_queues)}

    def rows(
        self, now: datetime, task_ids: list[int], queue_ids: list[int], ids: list[int]
    ) -> list[tuple[Any, ...]]:
        """The COPY rows: the values the schema's ``add_jobs`` would write, defaults filled in."""
        if self.plain:
            return [
                (job_id, task_ids[task_at], spec.payload_json)
                for spec, job_id, task_at in zip(self.specs, ids, self.task_index, strict=True)
            ]
        zone = now.tzinfo
        return [
            (
                job_id,
                None if queue_at is None else queue_ids[queue_at],
                task_ids[task_at],
                spec.payload_json,
                now if spec.run_at is None else spec.run_at.astimezone(zone),
                _DEFAULT_MAX_ATTEMPTS if spec.max_attempts is None else spec.max_attempts,
                _DEFAULT_PRIORITY if spec.priority is None else spec.priority,
                _flags_field(spec.flags),
            )
            for spec, job_id, task_at, queue_at in zip(
                self.specs, ids, self.task_index, self.queue_index, strict=True
            )
        ]

    def jobs(self, now: datetime, rows: list[tuple[Any, ...]]) -> list[Job]:
        """The ``Job`` records the rows make (what ``add_jobs`` returns), payloads decoded anew.

        Built while the server is still writing the rows it was sent.
        """
        payloads = json.loads("[" + ",".join([spec.payload_json for spec in self.specs]) + "]")
        make = Job.from_values
        if self.plain:
            return [
                make(
                    (
                        row[0], None, row[1], spec.identifier, payload, _DEFAULT_PRIORITY, now,
                        0, _DEFAULT_MAX_ATTEMPTS, None, now, now, None, None, None, 0, None, True,
                    )
                )
                for spec, row, payload in zip(self.specs, rows, payloads, strict=True)
            ]  # fmt: skip
        return [
            make(
                (
                    row[0], row[1], row[2], spec.identifier, payload, row[6], row[4],
                    0, row[5], None, now, now, None, None, None, 0, _flags(spec.flags), True,
                )
            )
            for spec, row, payload in zip(self.specs, rows, payloads, strict=True)
        ]  # fmt: skip


def _flags(flags: Sequence[str] | None) -> dict[str, bool] | None:
    """Flags as the schema's ``add_jobs`` stores them: ``{flag: true}``, NULL for none."""
    return dict.fromkeys(flags, True) if flags else None


@lru_cache(maxsize=256)
def _flags_field(flags: Sequence[str] | None) -> bytes | None:
    """The flags column of a COPY row: jsonb's binary input (a version byte, then JSON text).

    Batches repeat a few flag sets, so each is encoded once (``JobSpec`` keeps
    flags as a tuple, hashable).
    """
    value = _flags(flags)
    if value is None:
        return None
    return _JSONB_BINARY_VERSION + json.dumps(value, separators=(",", ":")).encode()


def _found(task_ids: list[int | None], queue_ids: list[int | None]) -> tuple[list[int], list[int]]:
    """The ids, once ``bulk_add_missing`` has run; a row still missing was deleted meanwhile."""
    if None in task_ids or None in queue_ids:
        raise KongtaskError(
            "add_jobs: a task or queue row created for this batch was deleted before its "
            "jobs were written (a concurrent cleanup?); nothing was added"
        )
    return task_ids, queue_ids  # type: ignore[return-value]


def needs_transaction(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    """Whether statements that must commit together need a transaction of their own.

    Only an autocommit connection outside a transaction does: otherwise they
    join the caller's transaction (begun by psycopg if not yet), which the
    caller commits or rolls back.
    """
    return conn.autocommit and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def _one(row: tuple[Any, ...] | None) -> tuple[Any, ...]:
    if row is None:  # a select without from always gives one row
        raise KongtaskError("add_jobs: the bulk path's statement returned no row")
    return row


def add_bulk_on(
    conn: psycopg.Connection[Any], queries: Queries, specs: Sequence[JobSpec]
) -> list[Job]:
    """Add keyless ``specs`` through the bulk path; returns their jobs in input order."""
    batch = _Batch(specs)
    with (
        conn.transaction() if needs_transaction(conn) else nullcontext(),
        conn.cursor(binary=True, row_factory=tuple_row) as cursor,
    ):
        prepare = {**batch.targets_params, "schema": queries.schema, "count": len(specs)}
        now, task_ids, queue_ids, ids, _ = _one(
            cursor.execute(queries.bulk_add_prepare, prepare).fetchone()
        )
        missing = batch.missing_params(task_ids, queue_ids)
        if missing is not None:
            cursor.execute(queries.bulk_add_missing, missing)
            now, task_ids, queue_ids = _one(
                cursor.execute(queries.bulk_add_targets, batch.targets_params).fetchone()
            )
        found_tasks, found_queues = _found(task_ids, queue_ids)
        rows = batch.rows(now, found_tasks, found_queues, ids)
        with cursor.copy(batch.copy_statement(queries)) as copy:
            copy.set_types(batch.copy_types)
            for row in rows:
                copy.write_row(row)
            jobs = batch.jobs(now, rows)
    return jobs


async def add_bulk_on_async(
    conn: psycopg.AsyncConnection[Any], queries: Queries, specs: Sequence[JobSpec]
) -> list[Job]:
    """:func:`add_bulk_on` over an ``AsyncConnection``."""
    batch = _Batch(specs)
    async with (
        conn.transaction() if needs_transaction(conn) else nullcontext(),
        conn.cursor(binary=True, row_factory=tuple_row) as cursor,
    ):
        prepare = {**batch.targets_params, "schema": queries.schema, "count": len(specs)}
        await cursor.execute(queries.bulk_add_prepare, prepare)
        now, task_ids, queue_ids, ids, _ = _one(await cursor.fetchone())
        missing = batch.missing_params(task_ids, queue_ids)
        if missing is not None:
            await cursor.execute(queries.bulk_add_missing, missing)
            await cursor.execute(queries.bulk_add_targets, batch.targets_params)
            now, task_ids, queue_ids = _one(await cursor.fetchone())
        found_tasks, found_queues = _found(task_ids, queue_ids)
        rows = batch.rows(now, found_tasks, found_queues, ids)
        async with cursor.copy(batch.copy_statement(queries)) as copy:
            copy.set_types(batch.copy_types)
            for row in rows:
                await copy.write_row(row)
            jobs = batch.jobs(now, rows)
    return jobs
