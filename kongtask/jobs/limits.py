"""Fleet-wide limits and pauses: the model, the claimer's cached view, the pick.

A limit is kept per key, a ``(kind, value)`` pair: a task identifier, a named
queue or a job flag value (``flags`` of graphile-worker's jobs). It caps the
jobs of that key locked at once by every kongtask pool on the schema
(``concurrency``) and/or the starts in any window of ``rate.interval_s``
seconds (``rate.count``). A pause (task or queue) keeps its jobs queued.
Both live in kongtask's own tables (``migrations/kongtask_0005_limits.sql``);
a Node graphile-worker ignores them.

The claimer keeps a :class:`LimitSet` (refreshed on the ``kongtask:limits``
NOTIFY and every few seconds). Its ordinary claim leaves out every limited
or paused key with array parameters, so it costs nothing more; the jobs of
limited keys are taken by :func:`claim_limited`, a second claim run only
while limits exist. While every key has ample room it is one statement that
locks the limit rows shared (claims side by side); otherwise it locks them
exclusively (such claims take turns fleet-wide), counts what is locked per
key and picks within the headroom (:func:`plan_limited_claim`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, TypeVar

import psycopg

from kongtask.db.statements import LOCK_EXPIRY, Queries
from kongtask.errors import ConfigurationError

__all__ = [
    "LIMITS_CHANNEL",
    "SHARED_CLAIM_MAX",
    "Candidate",
    "KeyKind",
    "LimitInfo",
    "LimitKey",
    "LimitRow",
    "LimitSet",
    "LimitedPlan",
    "PauseInfo",
    "Rate",
    "claim_limited",
    "claim_limited_shared",
    "headroom",
    "limit_key",
    "parse_rate",
    "pick",
    "plan_limited_claim",
]

#: Announces limit and pause changes (``{"schema", "what": "changed"}``) and
#: limited jobs finishing (``"what": "released"``) to every pool.
LIMITS_CHANNEL = "kongtask:limits"

T = TypeVar("T")

KeyKind = Literal["task", "queue", "flag"]
#: A limited or paused key: (kind, value).
LimitKey = tuple[str, str]

_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hour": 3600.0}
_RATE = re.compile(r"\s*(\d+)\s*/\s*(\d*)\s*([a-z]+)\s*")
_MAX_KEY = 512

#: The most jobs a claim under the shared lock takes (whatever its pool's batch):
#: the room it must see is this much for every pool.
SHARED_CLAIM_MAX = 32


@dataclass(frozen=True)
class Rate:
    """At most ``count`` starts in any window of ``interval_s`` seconds."""

    count: int
    interval_s: float

    def __str__(self) -> str:
        for unit, seconds in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
            if self.interval_s == seconds:
                return f"{self.count}/{unit}"
        return f"{self.count}/{self.interval_s:g}s"


def parse_rate(value: object) -> Rate:
    """``"10/s"``, ``"5/m"``, ``"100/h"`` (also ``"3/10s"``) or a ``(count, seconds)`` pair.

    Raises :class:`ConfigurationError` naming the value for anything else.
    """
    if isinstance(value, Rate):
        return value
    if isinstance(value, tuple) and len(value) == 2:
        count, seconds = value
        if (
            isinstance(count, int)
            and not isinstance(count, bool)
            and isinstance(seconds, int | float)
            and not isinstance(seconds, bool)
        ):
            return _checked_rate(count, float(seconds), value)
    elif isinstance(value, str):
        found = _RATE.fullmatch(value.lower())
        if found and found[3] in _UNITS:
            multiple = int(found[2]) if found[2] else 1
            return _checked_rate(int(found[1]), multiple * _UNITS[found[3]], value)
    raise ConfigurationError(
        f"rate {value!r} is not N/s, N/m, N/h (or N/<k>s) nor a (count, seconds) pair",
        name="rate",
        value=value,
    )


def _checked_rate(count: int, seconds: float, value: object) -> Rate:
    if count < 1:
        raise ConfigurationError(
            f"rate {value!r}: the count must be at least 1", name="rate", value=value
        )
    if not 0 < seconds <= 366 * 86400:
        raise ConfigurationError(
            f"rate {value!r}: the interval must be more than 0 s and at most a year",
            name="rate",
            value=value,
        )
    return Rate(count, seconds)


def limit_key(
    task: str | None, queue: str | None, flag: str | None = None, *, what: str = "limit"
) -> LimitKey:
    """The one key given as ``task``, ``queue=`` or ``flag=``; a clear error otherwise."""
    given = [(kind, key) for kind, key in (("task", task), ("queue", queue), ("flag", flag))]
    named = [(kind, key) for kind, key in given if key is not None]
    kinds = "a task, queue= or flag=" if what == "limit" else "a task or queue="
    if len(named) != 1:
        raise ConfigurationError(
            f"{what}: give exactly one of {kinds} (got {len(named)})", name="key", value=named
        )
    kind, key = named[0]
    if not isinstance(key, str) or not 1 <= len(key) <= _MAX_KEY:
        raise ConfigurationError(
            f"{what}: the {kind} must be text of 1 to {_MAX_KEY} characters, not {key!r}",
            name=kind,
            value=key,
        )
    return kind, key


@dataclass(frozen=True)
class LimitInfo:
    """A limit as listed: its key, its caps, and how many of its jobs are locked now."""

    key_kind: str
    key: str
    concurrency: int | None
    rate: Rate | None
    running: int
    updated_at: datetime


@dataclass(frozen=True)
class PauseInfo:
    """A pause as listed: its key, who paused it and when."""

    key_kind: str
    key: str
    paused_by: str
    paused_at: datetime


@dataclass(frozen=True)
class LimitSet:
    """The limited and paused keys a pool knows of (empty: nothing to do)."""

    limited: frozenset[LimitKey] = frozenset()
    paused: frozenset[LimitKey] = frozenset()

    @classmethod
    def from_rows(cls, rows: Iterable[Sequence[Any]]) -> LimitSet:
        """From ``limit_snapshot`` rows: (what, kind, key) with what ``limit`` or ``pause``."""
        limited: set[LimitKey] = set()
        paused: set[LimitKey] = set()
        for what, kind, key in rows:
            (limited if what == "limit" else paused).add((kind, key))
        return cls(frozenset(limited), frozenset(paused))

    def keys(self, kind: str, *, paused: bool = False) -> list[str]:
        """The limited (or paused) values of one kind, sorted."""
        return sorted(key for k, key in (self.paused if paused else self.limited) if k == kind)

    def job_keys(self, task: str | None, queue: str | None, flags: object) -> list[LimitKey]:
        """The limited keys a job of ``task`` in ``queue`` with ``flags`` falls under."""
        found = [key for key in (("task", task), ("queue", queue)) if key in self.limited]
        if isinstance(flags, Mapping) and flags:
            found += [("flag", str(flag)) for flag in flags if ("flag", str(flag)) in self.limited]
        return found


@dataclass(frozen=True)
class LimitRow:
    """A limit row as the limited claim reads it (locked), with the rate's recent starts."""

    key: LimitKey
    concurrency: int | None
    rate: Rate | None
    starts: tuple[datetime, ...]


def headroom(row: LimitRow, running: int, now: datetime) -> tuple[int, float | None]:
    """How many more jobs of the key may start now, and (if the rate binds) in how many
    seconds one more may."""
    room = 1 << 30
    if row.concurrency is not None:
        room = row.concurrency - running
    retry_in: float | None = None
    if row.rate is not None:
        window = timedelta(seconds=row.rate.interval_s)
        recent = sorted(start for start in row.starts if start > now - window)
        rate_room = row.rate.count - len(recent)
        if rate_room <= 0 and recent:
            opens = recent[-row.rate.count] + window
            retry_in = max(0.0, (opens - now).total_seconds())
        room = min(room, rate_room)
    return max(0, room), retry_in


@dataclass(frozen=True)
class Candidate:
    """A runnable job of some limited key, in claim order."""

    id: int
    queue: str | None
    keys: tuple[LimitKey, ...]


def pick(candidates: Iterable[Candidate], room: dict[LimitKey, int], want: int) -> list[Candidate]:
    """Take candidates in order while every limit they fall under has room, one per
    named queue, at most ``want``; ``room`` is used up as they are taken."""
    taken: list[Candidate] = []
    queues: set[str] = set()
    for job in candidates:
        if len(taken) >= want:
            break
        if job.queue is not None and job.queue in queues:
            continue
        if any(room.get(key, 0) <= 0 for key in job.keys):
            continue
        for key in job.keys:
            room[key] -= 1
        if job.queue is not None:
            queues.add(job.queue)
        taken.append(job)
    return taken


@dataclass
class LimitedPlan:
    """What a limited claim decided: the job ids to lock (``claim_limited``), or,
    when every open key has room for the whole batch and none has a rate, the
    parameters of ``claim_limited_runnable`` (one statement, as the ordinary
    claim); and when a rate that binds lets one more start (seconds; None: no
    rate binds)."""

    ids: list[int] = field(default_factory=list)
    runnable: dict[str, Any] | None = None
    retry_in_s: float | None = None
    #: The room was ample: the next claim may try the shared way.
    shared_ok: bool = False
    #: The claim was the shared one (``claim_limited_shared``).
    shared: bool = False


def plan_limited_claim(
    conn: psycopg.Connection[Any],
    queries: Queries,
    limits: LimitSet,
    *,
    task_ids: Mapping[int, str],
    want: int,
    now: datetime | None,
    forbidden_flags: list[str] | None,
) -> LimitedPlan:
    """Inside the caller's transaction: lock every limit row (one claim of limited
    jobs at a time, fleet-wide), count the jobs locked per key, and plan a claim
    within the headroom; record the starts of rate-limited keys and which keys
    are out of room with jobs waiting (see ``notify_released``). The caller runs
    the planned claim before committing.

    ``shared_ok`` says whether the next claim may take the shared way (see
    :func:`claim_limited_shared`); this one then takes at most
    :data:`SHARED_CLAIM_MAX` jobs, as a shared claim would, since a shared one
    that waited for the rows may not see them. Otherwise a claim that takes
    jobs rewrites every limit row, so that such a claim gives way."""
    plan = LimitedPlan()
    rows = conn.execute(queries.lock_limits).fetchall()
    if not rows:
        return plan
    db_now: datetime = rows[0][-2]
    pools: int = max(1, rows[0][-1])
    limit_rows = {
        (kind, key): LimitRow(
            (kind, key),
            concurrency,
            Rate(rate_count, rate_s) if rate_count is not None else None,
            tuple(starts or ()),
        )
        for kind, key, concurrency, rate_count, rate_s, starts, *_ in rows
    }
    was_waiting = {(row[0], row[1]) for row in rows if row[6]}
    keys = LimitSet(frozenset(limit_rows), limits.paused)
    room = _room(conn, queries, keys, limit_rows, db_now, plan)
    open_keys = {key for key, value in room.items() if value > 0}
    waiting = set(limit_rows) - open_keys
    plan.shared_ok = not waiting and all(
        room[key] >= pools * SHARED_CLAIM_MAX and row.rate is None
        for key, row in limit_rows.items()
    )
    if plan.shared_ok:
        # As a shared claim: one that waited for these rows may not see its jobs.
        want = min(want, SHARED_CLAIM_MAX)
    # Otherwise, taking jobs, rewrite the rows so such a claim sees they changed.
    touch = not plan.shared_ok
    if not open_keys:
        _record(conn, queries, was_waiting, waiting, {}, touch=False)
        return plan
    closed = LimitSet(frozenset(waiting))
    opened = LimitSet(frozenset(open_keys))
    params = _limited_params(
        _pool_params(limits, task_ids, forbidden_flags, now), task_ids, opened, closed
    )
    params["limited_flags"] = keys.keys("flag")
    if all(room[key] >= want and limit_rows[key].rate is None for key in open_keys):
        # No pick needed: the whole batch fits every key it could fall under.
        plan.runnable = {**params, "scan": want}
        _record(conn, queries, was_waiting, waiting, {}, touch=touch)
        return plan
    params["scan"] = max(want, sum(min(value, want) for value in room.values())) * 2
    candidates = [
        Candidate(job_id, queue, tuple(keys.job_keys(task, queue, dict.fromkeys(flags or ()))))
        for job_id, task, queue, flags in conn.execute(queries.limited_candidates, params)
    ]
    taken = pick(candidates, room, want)
    plan.ids = [job.id for job in taken]
    taken_ids = set(plan.ids)
    # Out of room with jobs of it left (seen, or possibly beyond the scan).
    waiting.update(
        key for job in candidates if job.id not in taken_ids for key in job.keys if room[key] <= 0
    )
    starts: dict[LimitKey, list[datetime]] = {}
    for job in taken:
        for key in job.keys:
            row = limit_rows[key]
            if row.rate is not None:
                starts.setdefault(key, list(row.starts)).append(db_now)
    trimmed = {
        key: times[-rate.count :]
        for key, times in starts.items()
        if (rate := limit_rows[key].rate) is not None
    }
    _record(conn, queries, was_waiting, waiting, trimmed, touch=touch and bool(taken))
    return plan


def claim_limited(
    conn: psycopg.Connection[Any],
    queries: Queries,
    limits: LimitSet,
    load: Callable[[psycopg.Cursor[Any]], list[T]],
    *,
    task_ids: Mapping[int, str],
    want: int,
    now: datetime | None,
    forbidden_flags: list[str] | None,
    pool_id: str,
    shared: bool,
) -> tuple[list[T], LimitedPlan]:
    """Run one claim of limited jobs for ``pool_id``: with ``shared`` (the last claim
    found ample room) first the shared way (:func:`claim_limited_shared`); else,
    or when that way is refused, the exclusive one, planned by
    :func:`plan_limited_claim` and run in the same transaction. ``load`` reads
    the claimed rows from the cursor."""
    if shared:
        params = _pool_params(limits, task_ids, forbidden_flags, now)
        jobs = claim_limited_shared(
            conn, queries, limits, load, params, task_ids=task_ids, want=want, pool_id=pool_id
        )
        if jobs is not None:
            return jobs, LimitedPlan(shared=True, shared_ok=True)
    with conn.transaction():
        plan = plan_limited_claim(
            conn,
            queries,
            limits,
            task_ids=task_ids,
            want=want,
            now=now,
            forbidden_flags=forbidden_flags,
        )
        if plan.runnable is not None:
            statement, params = queries.claim_limited_runnable, plan.runnable
        elif plan.ids:
            statement, params = queries.claim_limited, {"ids": plan.ids}
        else:
            return [], plan
        with conn.cursor() as cursor:
            cursor.execute(statement, {**params, "pool_id": pool_id})
            return load(cursor), plan


def claim_limited_shared(
    conn: psycopg.Connection[Any],
    queries: Queries,
    limits: LimitSet,
    load: Callable[[psycopg.Cursor[Any]], list[T]],
    params: Mapping[str, Any],
    *,
    task_ids: Mapping[int, str],
    want: int,
    pool_id: str,
) -> list[T] | None:
    """The shared way, one statement in its own transaction (``conn`` in autocommit):
    claim up to :data:`SHARED_CLAIM_MAX` jobs of the limited keys the pool knows,
    or None when the limit rows refuse it (a rate, jobs waiting, less room than
    that many for every kongtask pool, or an exclusive claim committed while
    this one waited for the rows).

    That keeps every limit: each pool has at most one claim in flight, so the
    claims a shared one cannot see (in flight, not yet committed) are at most
    one per other pool, each under the same cap; an exclusive claim waits for
    every shared one to commit before it counts (in a statement after its
    lock) and, when it finds ample room, takes no more than a shared claim;
    and one that found less and committed while a shared claim waited is
    caught by the row versions (it rewrites the rows when it takes jobs)."""
    statement_params = {
        **_limited_params(params, task_ids, LimitSet(limits.limited), LimitSet()),
        "scan": min(want, SHARED_CLAIM_MAX),
        "shared_max": SHARED_CLAIM_MAX,
        "expiry": LOCK_EXPIRY,
        "pool_id": pool_id,
    }
    with conn.cursor() as cursor:
        cursor.execute(queries.claim_limited_shared, statement_params)
        result = cursor.pgresult
        assert result is not None and result.ntuples >= 1
        if result.get_value(0, 0) is not None:
            return load(cursor)
        # One row of nulls: nothing claimed; its last column says whether it could.
        return [] if result.get_value(0, result.nfields - 1) == b"1" else None


def _pool_params(
    limits: LimitSet,
    task_ids: Mapping[int, str],
    forbidden_flags: list[str] | None,
    now: datetime | None,
) -> dict[str, Any]:
    """The ``runnable_for_pool`` parameters of a limited claim: the pool's tasks and
    queues less the paused ones, its forbidden flags, its clock."""
    return {
        "task_ids": [
            task_id for task_id, name in task_ids.items() if ("task", name) not in limits.paused
        ],
        "excluded_queues": limits.keys("queue", paused=True),
        "forbidden_flags": forbidden_flags,
        "now": now,
    }


def _limited_params(
    base: Mapping[str, Any], task_ids: Mapping[int, str], opened: LimitSet, closed: LimitSet
) -> dict[str, Any]:
    """The ``limited_runnable`` parameters: ``base`` (``_pool_params``) with the open
    and closed keys. When only tasks are open the pool's task ids are narrowed to
    them instead (``only_tasks``), so the planner sees one test of the task id,
    not two, and estimates the matching jobs as they are."""
    params = {
        **base,
        "open_task_ids": _task_ids_of(task_ids, opened),
        "open_queues": opened.keys("queue"),
        "open_flags": opened.keys("flag"),
        "closed_task_ids": _task_ids_of(task_ids, closed),
        "closed_queues": closed.keys("queue"),
        "closed_flags": closed.keys("flag"),
        "only_tasks": not opened.keys("queue") and not opened.keys("flag"),
    }
    if params["only_tasks"]:
        open_ids = set(params["open_task_ids"])
        params["task_ids"] = [task_id for task_id in base["task_ids"] if task_id in open_ids]
    return params


def _task_ids_of(task_ids: Mapping[int, str], limits: LimitSet) -> list[int]:
    """The ids of the pool's tasks that are limited keys of ``limits``."""
    return sorted(task_id for task_id, name in task_ids.items() if ("task", name) in limits.limited)


def _room(
    conn: psycopg.Connection[Any],
    queries: Queries,
    keys: LimitSet,
    limit_rows: Mapping[LimitKey, LimitRow],
    db_now: datetime,
    plan: LimitedPlan,
) -> dict[LimitKey, int]:
    """The headroom of every limited key (counting the jobs locked now); notes in
    ``plan`` when a binding rate lets one more start."""
    params = {
        "tasks": keys.keys("task"),
        "queues": keys.keys("queue"),
        "flags": keys.keys("flag"),
        "expiry": LOCK_EXPIRY,
    }
    running: dict[LimitKey, int] = dict.fromkeys(limit_rows, 0)
    for task, queue, flags in conn.execute(queries.locked_limited_jobs, params):
        for key in keys.job_keys(task, queue, dict.fromkeys(flags or ())):
            running[key] += 1
    room: dict[LimitKey, int] = {}
    for key, row in limit_rows.items():
        room[key], retry_in = headroom(row, running[key], db_now)
        if retry_in is not None:
            plan.retry_in_s = min(retry_in, plan.retry_in_s or retry_in)
    return room


def _record(
    conn: psycopg.Connection[Any],
    queries: Queries,
    was_waiting: set[LimitKey],
    waiting: set[LimitKey],
    starts: Mapping[LimitKey, list[datetime]],
    *,
    touch: bool,
) -> None:
    """Write the new rate starts and the keys now waiting, if anything changed; with
    ``touch`` (the claim takes jobs) rewrite every row, so a shared claim waiting
    on them sees they changed (``claim_limited_shared``)."""
    if waiting == was_waiting and not starts and not touch:
        return
    rows: list[dict[str, Any]] = []
    for kind, key in waiting | was_waiting | set(starts):
        row: dict[str, Any] = {"kind": kind, "key": key, "waiting": (kind, key) in waiting}
        times = starts.get((kind, key))
        if times is not None:
            row["starts"] = [when.isoformat() for when in times]
        rows.append(row)
    conn.execute(queries.record_limited_claim, {"rows": json.dumps(rows), "touch": touch})
