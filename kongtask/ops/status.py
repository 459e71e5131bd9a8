"""Inspecting the queue: what is ready, scheduled, running, retrying or failed, and where.

These functions back ``WorkerUtils.status()``/``list_jobs()``/``get_job()``,
``kongtask status``, ``kongtask jobs`` and the dashboard, so every view of the
queue counts the same way. Each takes an open connection and the schema's
:class:`~kongtask.db.statements.Queries`; the records they return are frozen and turn
into plain JSON-ready dicts with :func:`to_jsonable`.

A job's state comes from its columns alone (see the ``job_state`` fragment in
``kongtask/db/sql/ops.sql``): ``running`` (locked by a pool), ``failed`` (its
attempts are used up: permanently failed), ``retrying`` (failed before and
waiting for its next attempt), ``scheduled`` (never tried, ``run_at`` in the
future) and ``ready`` (runnable now, perhaps behind a locked named queue).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import dict_row

from kongtask.cron import next_fire_times, render_cron_item
from kongtask.cron.types import ParsedCronItem
from kongtask.db.statements import LOCK_EXPIRY, Queries
from kongtask.errors import InvalidJobError
from kongtask.job import Job
from kongtask.jobs.enqueue import jobs_from_query
from kongtask.jobs.limits import LimitInfo, PauseInfo
from kongtask.ops import limits as fleet

__all__ = [
    "JOB_STATES",
    "LIVE_POOL_BOUND_S",
    "CronStatus",
    "JobInfo",
    "LockedQueue",
    "PoolInfo",
    "StateCounts",
    "StatusReport",
    "failures_by_minute",
    "get_job",
    "jobs_deleted_total",
    "list_jobs",
    "list_pools",
    "retry_jobs",
    "search_jobs",
    "status",
    "to_jsonable",
    "unserved_tasks",
]

#: The job states, in the order a job usually moves through them.
JOB_STATES = ("ready", "scheduled", "running", "retrying", "failed")

#: A pool counts as live when its heartbeat (``_kongtask_pools.last_seen``) is this recent.
LIVE_POOL_BOUND_S = 60.0

#: The most jobs one listing returns.
MAX_LIST_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class StateCounts:
    """How many jobs of one task (or one named queue, or all) are in each state."""

    name: str | None
    ready: int = 0
    scheduled: int = 0
    running: int = 0
    retrying: int = 0
    failed: int = 0

    @property
    def total(self) -> int:
        """Every job counted here."""
        return self.ready + self.scheduled + self.running + self.retrying + self.failed


@dataclass(frozen=True, slots=True)
class LockedQueue:
    """A named queue some pool holds (it runs that queue's current job)."""

    queue_name: str
    locked_by: str
    locked_at: datetime


@dataclass(frozen=True, slots=True)
class PoolInfo:
    """A kongtask worker pool from its heartbeat row; ``live`` when recently seen."""

    pool_id: str
    hostname: str
    pid: int
    concurrency: int
    started_at: datetime
    last_seen: datetime
    version: str
    live: bool
    running: int = 0
    #: Executor threads stuck in a handler past its timeout (their slots were refilled).
    stuck_threads: int = 0


@dataclass(frozen=True, slots=True)
class CronStatus:
    """One cron identifier: its item (when a crontab was given), last and next firing."""

    identifier: str
    task: str | None
    spec: str | None
    known_since: datetime | None
    last_execution: datetime | None
    next_firing: datetime | None


@dataclass(frozen=True, slots=True)
class StatusReport:
    """The whole queue at one instant (``now`` is the database's clock)."""

    now: datetime
    totals: StateCounts
    tasks: tuple[StateCounts, ...]
    queues: tuple[StateCounts, ...]
    running_by_pool: dict[str, int]
    locked_queues: tuple[LockedQueue, ...]
    pools: tuple[PoolInfo, ...]
    cron: tuple[CronStatus, ...]
    #: Fleet-wide limits (with how many jobs of each key are locked now) and pauses.
    limits: tuple[LimitInfo, ...] = ()
    pauses: tuple[PauseInfo, ...] = ()
    #: Things an operator should look at (see :func:`fleet_warnings`).
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class JobInfo:
    """A job with its named queue and state (what listings and the detail view show)."""

    job: Job
    queue_name: str | None
    state: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> int:
        """The job's id."""
        return self.job.id


def _counts(name: str | None, by_state: dict[str, int]) -> StateCounts:
    return StateCounts(name, **{state: by_state.get(state, 0) for state in JOB_STATES})


def _now(conn: psycopg.Connection[Any], queries: Queries) -> datetime:
    row = conn.execute(queries.ping).fetchone()
    assert row is not None
    now: datetime = row[0]
    return now


def list_pools(
    conn: psycopg.Connection[Any], queries: Queries, *, live_only: bool = False
) -> list[PoolInfo]:
    """Pools from the heartbeat table, newest heartbeat first."""
    with conn.cursor(row_factory=dict_row) as cursor:
        rows = cursor.execute(queries.pools, {"live_bound_s": LIVE_POOL_BOUND_S}).fetchall()
    pools = [PoolInfo(**row) for row in rows]
    return [pool for pool in pools if pool.live] if live_only else pools


def status(
    conn: psycopg.Connection[Any],
    queries: Queries,
    *,
    cron_items: Sequence[ParsedCronItem] = (),
) -> StatusReport:
    """Count jobs per task, per named queue and per pool; list locks, live pools and cron.

    ``cron_items`` (a parsed crontab) adds each item's task, spec and next
    firing to the identifiers the database knows from ``_private_known_crontabs``.
    """
    now = _now(conn, queries)
    tasks: dict[str, dict[str, int]] = {}
    queues: dict[str, dict[str, int]] = {}
    totals: dict[str, int] = {}
    running_by_pool: dict[str, int] = {}
    with conn.cursor(row_factory=dict_row) as cursor:
        for row in cursor.execute(queries.status_counts).fetchall():
            state, count = row["state"], row["jobs"]
            for bucket in (tasks.setdefault(row["task"], {}), totals):
                bucket[state] = bucket.get(state, 0) + count
            if row["queue"] is not None:
                bucket = queues.setdefault(row["queue"], {})
                bucket[state] = bucket.get(state, 0) + count
            if state == "running" and row["locked_by"] is not None:
                pool = row["locked_by"]
                running_by_pool[pool] = running_by_pool.get(pool, 0) + count
        locked = [LockedQueue(**row) for row in cursor.execute(queries.locked_queues).fetchall()]
        known = {row["identifier"]: row for row in cursor.execute(queries.known_crontabs)}
    pools = [
        dataclasses.replace(pool, running=running_by_pool.get(pool.pool_id, 0))
        for pool in list_pools(conn, queries, live_only=True)
    ]
    task_counts = tuple(_counts(name, counts) for name, counts in sorted(tasks.items()))
    return StatusReport(
        now=now,
        totals=_counts(None, totals),
        tasks=task_counts,
        queues=tuple(_counts(name, counts) for name, counts in sorted(queues.items())),
        running_by_pool=dict(sorted(running_by_pool.items())),
        locked_queues=tuple(locked),
        pools=tuple(pools),
        cron=_cron_status(cron_items, known, now),
        limits=tuple(fleet.list_limits(conn, queries)),
        pauses=tuple(fleet.list_pauses(conn, queries)),
        warnings=tuple(fleet_warnings(conn, queries, task_counts)),
    )


def fleet_warnings(
    conn: psycopg.Connection[Any], queries: Queries, tasks: Iterable[StateCounts]
) -> list[str]:
    """Ready jobs of a task no live kongtask pool serves, and jobs of limited keys held
    by a holder with no live liveness record (which the limit cannot count on)."""
    bound = {"live_bound_s": LIVE_POOL_BOUND_S, "expiry": LOCK_EXPIRY}
    served: set[str] = set()
    everything = False
    for (pool_tasks,) in conn.execute(queries.live_pool_tasks, bound):
        if pool_tasks is None:
            everything = True  # an older kongtask pool: it did not say what it serves
        else:
            served.update(pool_tasks)
    warnings = [
        f"no live pool serves task `{counts.name}`: {counts.ready} ready"
        for counts in tasks
        if counts.ready and not everything and counts.name not in served
    ]
    for kind, key, holder, count in conn.execute(queries.limited_jobs_of_unknown_pools, bound):
        warnings.append(
            f"{count} job(s) of limited {kind} `{key}` locked by `{holder}`, which has no live "
            "kongtask liveness record (a Node graphile-worker or a dead pool): the limit does "
            "not govern it"
        )
    return warnings


def _cron_status(
    items: Sequence[ParsedCronItem], known: dict[str, dict[str, Any]], now: datetime
) -> tuple[CronStatus, ...]:
    by_identifier = {item.identifier: item for item in items}
    result = []
    for identifier in sorted(set(by_identifier) | set(known)):
        item = by_identifier.get(identifier)
        row = known.get(identifier, {})
        following = next_fire_times(item, now, 1) if item is not None else []
        result.append(
            CronStatus(
                identifier=identifier,
                task=item.task if item is not None else None,
                spec=render_cron_item(item) if item is not None else None,
                known_since=row.get("known_since"),
                last_execution=row.get("last_execution"),
                next_firing=following[0] if following else None,
            )
        )
    return tuple(result)


def _check_state(state: str | None) -> None:
    if state is not None and state not in JOB_STATES:
        raise InvalidJobError(
            f"unknown job state {state!r}; expected one of: {', '.join(JOB_STATES)}",
            field="state",
            value=state,
        )


def _check_limit(limit: int) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST_LIMIT:
        raise InvalidJobError(
            f"limit must be an integer between 1 and {MAX_LIST_LIMIT}, got {limit!r}",
            field="limit",
            value=limit,
        )


def _check_text(name: str, value: str | None) -> None:
    if value is not None and not isinstance(value, str):
        raise InvalidJobError(f"{name} must be a string or None", field=name, value=value)


def check_job_ids(ids: Iterable[int]) -> list[int]:
    """The ids as a list, or ``InvalidJobError`` naming the first bad one."""
    if isinstance(ids, str | bytes) or not isinstance(ids, Iterable):
        raise InvalidJobError("ids must be a list of job ids", field="ids", value=ids)
    result = list(ids)
    for job_id in result:
        if isinstance(job_id, bool) or not isinstance(job_id, int) or not 0 < job_id < 2**63:
            raise InvalidJobError(
                f"ids must hold positive integer job ids, got {job_id!r}", field="ids", value=job_id
            )
    return result


_JOB_WIDTH = 18  # the job_columns of kongtask/db/sql/jobs.sql, in Job's field order


def _job_infos(
    conn: psycopg.Connection[Any],
    queries: Queries,
    params: dict[str, Any],
    statement: Any = None,
) -> list[JobInfo]:
    """Rows of ``statement`` (default list_jobs: job_columns, queue name, state, then
    anything) as JobInfo. Columns after the state land in ``extra`` under their names.
    """
    with conn.cursor() as cursor:
        query = queries.list_jobs if statement is None else statement
        rows = cursor.execute(query, params).fetchall()
        names = [column.name for column in cursor.description or ()]
    if not rows:
        return []
    # One json.loads for every payload (they arrive as text), as jobs_from_query does.
    payloads = json.loads("[" + ",".join(row[4] for row in rows) + "]")
    return [
        JobInfo(
            Job(*[*row[:4], payload, *row[5:_JOB_WIDTH]]),
            queue_name=row[_JOB_WIDTH],
            state=row[_JOB_WIDTH + 1],
            extra=dict(zip(names[_JOB_WIDTH + 2 :], row[_JOB_WIDTH + 2 :], strict=True)),
        )
        for row, payload in zip(rows, payloads, strict=True)
    ]


def list_jobs(
    conn: psycopg.Connection[Any],
    queries: Queries,
    *,
    task: str | None = None,
    queue: str | None = None,
    state: str | None = None,
    limit: int = 100,
) -> list[JobInfo]:
    """Jobs matching every filter given (``None`` matches all), oldest ``run_at`` first."""
    _check_text("task", task)
    _check_text("queue", queue)
    _check_state(state)
    _check_limit(limit)
    params = {"task": task, "queue": queue, "state": state, "ids": None, "limit": limit}
    return _job_infos(conn, queries, params)


def unserved_tasks(conn: psycopg.Connection[Any], queries: Queries) -> list[tuple[str, int]]:
    """(task, runnable jobs) for each task with due jobs that no live kongtask pool serves."""
    rows = conn.execute(queries.unserved_tasks, {"live_bound_s": LIVE_POOL_BOUND_S}).fetchall()
    return [(row[0], int(row[1])) for row in rows]


def like_pattern(text: str) -> str:
    """``text`` as a LIKE pattern matching it anywhere (its own ``%``, ``_``, ``\\`` literal)."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def search_jobs(
    conn: psycopg.Connection[Any],
    queries: Queries,
    *,
    task: str | None = None,
    queue: str | None = None,
    state: str | None = None,
    text: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[JobInfo], int]:
    """One page of the jobs matching the filters and ``text``, and how many match in all.

    ``text`` matches a job's id written out, or appears (any case) in its key,
    task, queue, payload or last error.
    """
    _check_text("task", task)
    _check_text("queue", queue)
    _check_text("text", text)
    _check_state(state)
    _check_limit(limit)
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise InvalidJobError("offset must be an int >= 0", field="offset", value=offset)
    params = {
        "task": task,
        "queue": queue,
        "state": state,
        "ids": None,
        "text": text,
        "pattern": like_pattern(text) if text else None,
        "limit": limit,
        "offset": offset,
    }
    infos = _job_infos(conn, queries, params, queries.dashboard_jobs)
    if infos:
        return infos, int(infos[0].extra["total"])
    if offset == 0:
        return [], 0
    # Past the last page: count what matches.
    return [], search_jobs(conn, queries, task=task, queue=queue, state=state, text=text, limit=1)[
        1
    ]


def get_job(conn: psycopg.Connection[Any], queries: Queries, job_id: int) -> JobInfo | None:
    """One job with its queue, state and timing (``extra``), or ``None`` if there is none.

    ``extra`` holds ``now`` (the database clock), ``age_s`` (since created),
    ``due_in_s`` (until ``run_at``; negative when overdue), ``locked_for_s``
    and ``attempts_left``.
    """
    (job_id,) = check_job_ids([job_id])
    params = {"task": None, "queue": None, "state": None, "ids": [job_id], "limit": 1}
    found = _job_infos(conn, queries, params)
    if not found:
        return None
    info = found[0]
    now = _now(conn, queries)
    job = info.job

    def seconds(delta: timedelta) -> float:
        return round(delta.total_seconds(), 3)

    extra = {
        "now": now,
        "age_s": seconds(now - job.created_at),
        "due_in_s": seconds(job.run_at - now),
        "locked_for_s": seconds(now - job.locked_at) if job.locked_at else None,
        "attempts_left": max(0, job.max_attempts - job.attempts),
    }
    return dataclasses.replace(info, extra=extra)


def retry_jobs(conn: psycopg.Connection[Any], queries: Queries, ids: Iterable[int]) -> list[Job]:
    """Make jobs run now (a used-up job gets one more attempt); returns those changed.

    Running jobs are skipped (unless their lock is stale). Workers are woken
    at once with the ``jobs:insert`` notification the schema's ``add_jobs``
    sends.
    """
    return jobs_from_query(conn, queries, queries.retry_jobs, {"ids": check_job_ids(ids)})


def failures_by_minute(
    conn: psycopg.Connection[Any], queries: Queries
) -> list[tuple[datetime, int]]:
    """Jobs whose latest failure fell in each minute of the last hour (minutes with some)."""
    return [(row[0], row[1]) for row in conn.execute(queries.failures_by_minute).fetchall()]


def jobs_deleted_total(
    conn: psycopg.Connection[Any], queries: Queries
) -> tuple[int, datetime] | None:
    """PostgreSQL's count of rows ever deleted from the jobs table, and the database time.

    Jobs are deleted when they complete (or are removed), so two samples give
    the throughput in between. ``None`` if statistics are unavailable.
    """
    row = conn.execute(queries.jobs_deleted_total, {"schema": queries.schema}).fetchone()
    return (int(row[0]), row[1]) if row is not None else None


def to_jsonable(value: Any) -> Any:
    """Records, jobs, datetimes and containers as plain JSON values (for ``--json``)."""
    if isinstance(value, JobInfo):
        data = to_jsonable(value.job)
        data.update(queue_name=value.queue_name, state=value.state)
        data.update(to_jsonable(value.extra))
        return data
    if isinstance(value, StateCounts):
        data = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        data["total"] = value.total
        return data
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(item) for item in value]
    return value


def dumps(value: Any) -> str:
    """``value`` as indented JSON (through :func:`to_jsonable`)."""
    return json.dumps(to_jsonable(value), indent=2, sort_keys=False, ensure_ascii=False)
