"""The cron scheduler's database side: registers identifiers and writes firings.

One actor, one transaction at a time, each on a pooled connection. It decides
only what the database must decide: which of the firings the matcher proposes
are still new (the ``last_execution`` row lock that Node graphile-worker uses
too, plus kongtask's recorded gaps and history), and the ``noOverlap`` rule. It
tells the matcher how that went, so the matcher alone owns the timeline.
Each firing's job is a :class:`kongtask.JobSpec` added through the same door
as any other job (:func:`kongtask.jobs.enqueue.add_job_specs_on`), inside the
transaction that claims the firings and records their history.

One item cannot stop the others: when the minute's transaction fails with a
data or constraint error (SQLSTATE classes 22 and 23: a value PostgreSQL
refuses; or a value ``JobSpec`` refuses before sending it), the firings are
written again one identifier at a time, each under a savepoint; the ones
that still fail are reported as failed items and the rest are scheduled as
usual. Any other error (connection lost, a missing table)
fails the whole write, which the matcher retries for the same minute.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pykka
from psycopg.rows import dict_row

from kongtask.cron.matcher import matches, next_fire_times
from kongtask.cron.schedule import MINUTE, KnownCrontab, ceil_minute
from kongtask.cron.types import ParsedCronItem
from kongtask.db.statements import Queries
from kongtask.db.timestamps import tolerate_timestamps
from kongtask.errors import InvalidJobError
from kongtask.job_spec import JobSpec
from kongtask.jobs.enqueue import add_job_specs_on
from kongtask.runtime.actor import Actor, ErrorPolicy
from kongtask.runtime.probing import DatabaseWait

__all__ = [
    "CronWriter",
    "Planned",
    "Register",
    "Registered",
    "Schedule",
    "Scheduled",
    "WriteFailed",
]

logger = logging.getLogger(__name__)

ConnectionFactory = Callable[[], AbstractContextManager[psycopg.Connection[Any]]]

_ITEM_FAULT_CLASSES = ("22", "23")  # data exception, integrity constraint violation
# Gaps up to this long are looked for minute by minute; longer ones by the matcher.
_SCAN_LIMIT = timedelta(hours=2)
_FIRST_MINUTE = datetime.min.replace(tzinfo=UTC) + MINUTE


@dataclass(frozen=True, slots=True)
class Register:
    """Record these identifiers as known (``known_since = now``) and report the old ones."""

    identifiers: tuple[str, ...]
    now: datetime
    generation: int
    reply_to: pykka.ActorRef[Any]


@dataclass(frozen=True, slots=True)
class Registered:
    """Identifiers that were known before this registration, with their rows and gaps."""

    known: dict[str, KnownCrontab]
    generation: int


@dataclass(frozen=True, slots=True)
class Planned:
    """One firing the matcher proposes: the item, its minute, its job spec, and whether
    a rule already skips it (``skip_rule`` names the rule; ``skip_reason``, when the
    rule could not simply be applied, says why: a condition that timed out, say)."""

    item: ParsedCronItem
    ts: datetime
    spec: dict[str, Any]
    backfilled: bool
    skip_rule: str | None = None
    skip_reason: str | None = None


@dataclass(frozen=True, slots=True)
class Schedule:
    """Write these firings: only those newer than their identifier's ``last_execution``
    (or in a recorded gap, and not yet in the history) are added; the rest were
    scheduled already (by another instance, or before a clock went back)."""

    planned: tuple[Planned, ...]
    backfilled: bool
    generation: int
    reply_to: pykka.ActorRef[Any]


@dataclass(frozen=True, slots=True)
class Scheduled:
    """The firings are written. ``scheduled`` lists the (identifier, minute) pairs this
    instance added jobs for, ``skipped`` the (identifier, minute, rule) it skipped, and
    ``failed`` the (identifier, minute, error) whose writing the database refused."""

    scheduled: tuple[tuple[str, datetime], ...]
    generation: int
    skipped: tuple[tuple[str, datetime, str], ...] = ()
    failed: tuple[tuple[str, datetime, BaseException], ...] = ()
    job_ids: dict[tuple[str, datetime], int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WriteFailed:
    """A statement failed; the matcher retries with back-off."""

    stage: str
    error: BaseException
    generation: int


def is_item_fault(error: BaseException) -> bool:
    """Whether a value was refused (so one item, not the database, is at fault): by the
    database, or by ``JobSpec``'s checks before it was sent."""
    if isinstance(error, InvalidJobError):
        return True
    sqlstate = getattr(error, "sqlstate", None) or ""
    return isinstance(error, psycopg.Error) and sqlstate.startswith(_ITEM_FAULT_CLASSES)


class _Outcome:
    """What one write transaction did (accumulated over savepoints when isolating)."""

    def __init__(self) -> None:
        self.scheduled: list[tuple[str, datetime]] = []
        self.skipped: list[tuple[str, datetime, str]] = []
        self.failed: list[tuple[str, datetime, BaseException]] = []
        self.job_ids: dict[tuple[str, datetime], int] = {}


class CronWriter(Actor):
    """Runs the cron statements (see ``kongtask.db.statements``) for one scheduler."""

    # A failed statement is the sender's to retry: it gets WriteFailed (see recover).
    error_policy = ErrorPolicy.RECOVER

    def __init__(self, connect: ConnectionFactory, queries: Queries, node: str = "") -> None:
        super().__init__()
        self._connect = connect
        self._queries = queries
        self._node = node
        self._database_wait = DatabaseWait.of(self)

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection for the block; a liveness probe sees the block as a database wait."""
        with self._database_wait(), self._connect() as conn:
            yield conn

    def handle(self, message: Register | Schedule) -> None:
        match message:
            case Register(identifiers, now, generation, reply_to):
                known = self._register(identifiers, now)
                reply_to.tell(Registered(known, generation))
            case Schedule(planned, _, generation, reply_to):
                outcome = self._schedule(planned)
                reply_to.tell(
                    Scheduled(
                        tuple(outcome.scheduled),
                        generation,
                        tuple(outcome.skipped),
                        tuple(outcome.failed),
                        outcome.job_ids,
                    )
                )

    def recover(self, message: Register | Schedule, error: Exception) -> None:
        # Reported to the sender, never allowed to kill the actor.
        stage = "register" if isinstance(message, Register) else "schedule"
        logger.debug("cron %s failed: %r", stage, error)
        try:
            message.reply_to.tell(WriteFailed(stage, error, message.generation))
        except pykka.ActorDeadError:
            pass

    # --- registration -------------------------------------------------------------

    def _register(self, identifiers: Sequence[str], now: datetime) -> dict[str, KnownCrontab]:
        params = {"identifiers": list(identifiers), "now": now}
        with self._connection() as conn, conn.cursor(row_factory=dict_row) as cursor:
            # On the cursor: a Scheduler may run on an application's own pool.
            tolerate_timestamps(cursor)
            rows = cursor.execute(self._queries.register_crontabs, params).fetchall()
            gaps = self._gaps(cursor, [row["identifier"] for row in rows], None)
        return {
            row["identifier"]: KnownCrontab(
                row["identifier"],
                row["known_since"],
                row["last_execution"],
                tuple(gaps.get(row["identifier"], ())),
            )
            for row in rows
        }

    def _gaps(
        self, cursor: psycopg.Cursor[Any], identifiers: Sequence[str], since: datetime | None
    ) -> dict[str, list[tuple[datetime, datetime]]]:
        found: dict[str, list[tuple[datetime, datetime]]] = {}
        if not identifiers:
            return found
        rows = cursor.execute(
            self._queries.cron_gaps,
            {"identifiers": list(identifiers), "since": since},
        ).fetchall()
        for row in rows:
            values = list(row.values()) if isinstance(row, dict) else list(row)
            found.setdefault(values[0], []).append((values[1], values[2]))
        return found

    # --- scheduling ---------------------------------------------------------------

    def _schedule(self, planned: Sequence[Planned]) -> _Outcome:
        outcome = _Outcome()
        if not planned:
            return outcome
        with self._connection() as conn:
            try:
                with conn.transaction(), conn.cursor() as cursor:
                    tolerate_timestamps(cursor)
                    self._write(cursor, planned, outcome)
                return outcome
            except (psycopg.Error, InvalidJobError) as exc:
                if not is_item_fault(exc):
                    raise
                logger.warning("A cron write was refused (%s); isolating the items", exc)
            return self._isolate(conn, planned)

    def _isolate(self, conn: psycopg.Connection[Any], planned: Sequence[Planned]) -> _Outcome:
        """Write each identifier's firings under its own savepoint; report the refused ones."""
        outcome = _Outcome()
        groups: dict[str, list[Planned]] = {}
        for firing in planned:
            groups.setdefault(firing.item.identifier, []).append(firing)
        with conn.transaction(), conn.cursor() as cursor:
            tolerate_timestamps(cursor)
            for identifier, group in sorted(groups.items()):
                attempt = _Outcome()
                try:
                    with conn.transaction():
                        self._write(cursor, group, attempt)
                except (psycopg.Error, InvalidJobError) as exc:
                    if not is_item_fault(exc):
                        raise
                    outcome.failed.extend((identifier, firing.ts, exc) for firing in group)
                    continue
                outcome.scheduled.extend(attempt.scheduled)
                outcome.skipped.extend(attempt.skipped)
                outcome.job_ids.update(attempt.job_ids)
        return outcome

    def _write(
        self, cursor: psycopg.Cursor[Any], planned: Sequence[Planned], outcome: _Outcome
    ) -> None:
        queries = self._queries
        identifiers = sorted({firing.item.identifier for firing in planned})
        earliest = min(firing.ts for firing in planned)
        cursor.execute(
            self._queries.cron_ensure_known, {"identifiers": identifiers, "ts": earliest}
        )
        rows = cursor.execute(queries.cron_lock_known, {"identifiers": identifiers}).fetchall()
        known = {row[0]: (row[1], row[2]) for row in rows}
        gaps = self._gaps(cursor, identifiers, earliest)

        chosen: list[tuple[Planned, str | None]] = []
        new_gaps: list[tuple[str, datetime, datetime]] = []
        for firing in sorted(planned, key=lambda f: f.ts):
            identifier = firing.item.identifier
            known_since, last = known[identifier]
            if last is None or firing.ts > last:
                first_due = self._first_due(firing.item, last, known_since, firing.ts)
                if first_due is not None:
                    new_gaps.append((identifier, first_due, firing.ts))
                known[identifier] = (known_since, firing.ts)
                chosen.append((firing, firing.skip_rule))
            elif any(first <= firing.ts < end for first, end in gaps.get(identifier, ())):
                chosen.append((firing, firing.skip_rule))  # nobody scheduled it: fill the gap
        if not chosen:
            return
        chosen = self._apply_no_overlap(cursor, chosen)

        recorded = cursor.execute(
            queries.cron_record_firings,
            {
                "identifiers": [f.item.identifier for f, _ in chosen],
                "tasks": [f.item.task for f, _ in chosen],
                "timestamps": [f.ts for f, _ in chosen],
                "backfilled": [f.backfilled for f, _ in chosen],
                "outcomes": ["skipped" if rule else "scheduled" for _, rule in chosen],
                "rules": [rule for _, rule in chosen],
                "reasons": [f.skip_reason if rule == f.skip_rule else None for f, rule in chosen],
                "node": self._node,
            },
        ).fetchall()
        first = {(identifier, ts) for identifier, ts in recorded}
        chosen = [(f, rule) for f, rule in chosen if (f.item.identifier, f.ts) in first]
        if not chosen:
            return
        cursor.execute(
            queries.cron_advance,
            {
                "identifiers": [f.item.identifier for f, _ in chosen],
                "timestamps": [f.ts for f, _ in chosen],
            },
        )
        if new_gaps:
            cursor.execute(
                queries.cron_record_gaps,
                {
                    "identifiers": [g[0] for g in new_gaps],
                    "first_missed": [g[1] for g in new_gaps],
                    "ended_by": [g[2] for g in new_gaps],
                },
            )
        to_add = [f for f, rule in chosen if rule is None]
        outcome.skipped.extend((f.item.identifier, f.ts, rule) for f, rule in chosen if rule)
        if not to_add:
            return
        job_ids = self._add_jobs(cursor, to_add)
        cursor.execute(
            queries.cron_set_job_ids,
            {
                "identifiers": [f.item.identifier for f in to_add],
                "timestamps": [f.ts for f in to_add],
                "job_ids": job_ids,
            },
        )
        for firing, job_id in zip(to_add, job_ids, strict=True):
            outcome.scheduled.append((firing.item.identifier, firing.ts))
            outcome.job_ids[(firing.item.identifier, firing.ts)] = job_id

    def _add_jobs(self, cursor: psycopg.Cursor[Any], firings: Sequence[Planned]) -> list[int]:
        """Add the firings' jobs through the one enqueue door, inside this transaction;
        return their ids in the order of ``firings``."""
        jobs = add_job_specs_on(
            cursor.connection, self._queries, [job_of(f) for f in firings], operation="cron"
        )
        return [job.id for job in jobs]

    @staticmethod
    def _first_due(
        item: ParsedCronItem, last: datetime | None, known_since: datetime, before: datetime
    ) -> datetime | None:
        """The first minute in [after ``last`` (or from ``known_since``), ``before``) at which
        ``item`` fires, or None: the start of a gap that scheduling ``before`` leaves."""
        start = last + MINUTE if last is not None else ceil_minute(known_since)
        # '-infinity' (written by another client) loads as the first instant Python
        # holds, which has no minute before it.
        start = max(start, _FIRST_MINUTE)
        if before - start <= _SCAN_LIMIT:  # the usual case: minute by minute is cheapest
            ts = start
            while ts < before:
                if matches(item, ts):
                    return ts
                ts += MINUTE
            return None
        found = next_fire_times(item, start - MINUTE, 1)
        return found[0] if found and found[0] < before else None

    def _apply_no_overlap(
        self, cursor: psycopg.Cursor[Any], chosen: list[tuple[Planned, str | None]]
    ) -> list[tuple[Planned, str | None]]:
        """Skip firings of ``noOverlap`` items whose previous job is still queued or running."""
        guarded = sorted(
            {f.item.identifier for f, rule in chosen if rule is None and f.item.options.no_overlap}
        )
        if not guarded:
            return chosen
        rows = cursor.execute(self._queries.cron_still_running, {"identifiers": guarded}).fetchall()
        busy = {row[0] for row in rows}
        result: list[tuple[Planned, str | None]] = []
        for firing, rule in chosen:
            identifier = firing.item.identifier
            if rule is None and identifier in guarded:
                if identifier in busy:
                    rule = "noOverlap"
                else:
                    busy.add(identifier)  # this firing's job is the one the next would overlap
            result.append((firing, rule))
        return result


def job_of(firing: Planned) -> JobSpec:
    """The job a firing adds, at the firing's minute (``InvalidJobError`` if a value is refused).

    A ``job_key_mode`` without a job key means nothing, so it is left out.
    """
    spec = firing.spec
    return JobSpec(
        identifier=spec["task"],
        payload=spec["payload"],
        queue_name=spec["queue_name"],
        run_at=firing.ts,
        max_attempts=spec["max_attempts"],
        job_key=spec["job_key"],
        job_key_mode=spec["job_key_mode"] if spec["job_key"] is not None else None,
        priority=spec["priority"],
    )
