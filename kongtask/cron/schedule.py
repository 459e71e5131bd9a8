"""Pure pieces of the cron scheduler: job specs for a firing, and the backfill plan.

The scheduler actors do the timing and the database work; what a firing
writes and which missed minutes a start should fill are decided here, by
plain functions of their inputs, so they are easy to test and to reason about.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from kongtask.cron.index import CronIndex
from kongtask.cron.matcher import zone
from kongtask.cron.types import ParsedCronItem

__all__ = [
    "MINUTE",
    "KnownCrontab",
    "backfill_plan",
    "ceil_minute",
    "cron_timestamp",
    "floor_minute",
    "iso_minute",
    "job_spec",
    "skip_rule",
    "to_ms",
]

MINUTE = timedelta(minutes=1)


@dataclass(frozen=True, slots=True)
class KnownCrontab:
    """A row of ``_private_known_crontabs``: when an identifier was first seen and last run.

    ``gaps`` are kongtask's record of due minutes that ``last_execution`` moved past
    without anyone scheduling them, as ``(first_missed, ended_by)`` half-open ranges.
    """

    identifier: str
    known_since: datetime
    last_execution: datetime | None
    gaps: tuple[tuple[datetime, datetime], ...] = ()

    def in_gap(self, ts: datetime) -> bool:
        """Whether minute ``ts`` lies in a recorded gap (nobody scheduled it)."""
        return any(first <= ts < end for first, end in self.gaps)

    def may_backfill(self, ts: datetime) -> bool:
        """Whether minute ``ts`` is after this identifier's last run (or, never run,
        not before it became known), or in a gap: a minute already run is never redone."""
        if self.last_execution is not None:
            return ts > self.last_execution or self.in_gap(ts)
        return ts >= self.known_since


def floor_minute(when: datetime) -> datetime:
    """``when`` in UTC, cut down to its minute."""
    return when.astimezone(UTC).replace(second=0, microsecond=0)


def ceil_minute(when: datetime) -> datetime:
    """``when`` in UTC, rounded up to a whole minute (unchanged if already whole)."""
    floor = floor_minute(when)
    return floor if floor == when else floor + MINUTE


def to_ms(when: datetime) -> int:
    """Milliseconds since the epoch (how graphile-worker's cron events give times)."""
    return int(when.timestamp() * 1000)


def cron_timestamp(when: datetime) -> str:
    """ISO-8601 in UTC with milliseconds and ``Z``, as JavaScript's ``toISOString``."""
    utc = when.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def iso_minute(when: datetime) -> str:
    """ISO-8601 in UTC without fractions, the seed's form: ``"2024-01-01T04:00:00Z"``."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def job_spec(item: ParsedCronItem, ts: datetime, *, backfilled: bool) -> dict[str, Any]:
    """The job a firing of ``item`` at ``ts`` adds, in the scheduling statement's shape.

    The payload is the item's payload with ``_cron: {ts, backfilled}`` added
    (overwriting a user key of that name, as graphile-worker does).
    """
    options = item.options
    payload = dict(item.payload or {})
    payload["_cron"] = {"ts": cron_timestamp(ts), "backfilled": backfilled}
    return {
        "identifier": item.identifier,
        "task": item.task,
        "payload": payload,
        "queue_name": options.queue_name,
        "max_attempts": options.max_attempts,
        "job_key": options.job_key,
        "priority": options.priority,
        "job_key_mode": options.job_key_mode,
    }


def skip_rule(item: ParsedCronItem, ts: datetime) -> str | None:
    """The name of the declarative rule that skips this firing (``skipDates``), or None.

    ``noOverlap`` needs the database and is decided by the writer; a ``condition``
    is user code, called off the scheduling thread with a deadline (see
    :mod:`kongtask.cron.service.conditions`).
    """
    if item.options.skip_dates:
        local = ts.astimezone(zone(item.options.tz)) if item.options.tz else ts.astimezone(UTC)
        if local.date() in item.options.skip_dates:
            return "skipDates"
    return None


def backfill_plan(
    items: Sequence[ParsedCronItem],
    known: Mapping[str, KnownCrontab],
    start: datetime,
) -> Iterator[tuple[datetime, list[ParsedCronItem]]]:
    """The (minute, items) firings a scheduler starting at ``start`` should backfill.

    Only identifiers that were already known take part (a new identifier is
    registered, never backfilled); each only within its own ``fill`` window
    and after its last execution (or, never run, after it became known).
    Minutes come oldest first and stop before ``start``.
    """
    candidates = [
        item
        for item in items
        if item.identifier in known and item.options.backfill_period > timedelta(0)
    ]
    if not candidates:
        return
    largest = max(item.options.backfill_period for item in candidates)
    index = CronIndex(candidates)
    ts = ceil_minute(start - largest)
    while ts < start:
        age = start - ts
        due = [
            item
            for item in index.due(ts)
            if item.options.backfill_period >= age and known[item.identifier].may_backfill(ts)
        ]
        if due:
            yield ts, due
        ts += MINUTE
