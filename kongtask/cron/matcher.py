"""Decide which UTC minutes a parsed cron item fires at.

Items without ``tz`` match the UTC minute, as graphile-worker does. An item with a
``tz`` (kongtask-only) matches wall-clock time in its zone, and DST changes are
defined so that every wall time the fields name fires exactly once per day it
exists on the calendar:

* **Spring forward (a gap).** A wall time the clocks skip fires once, at the first
  valid minute after the gap: ``30 2 * * *`` in Europe/Berlin fires at 03:00 local
  (01:00 UTC) on the spring-forward day. Several skipped matches, or a skipped match
  plus a match on that first minute itself, still fire once at that minute.
* **Fall back (a fold).** A wall time that happens twice fires only at its first
  occurrence (the one with the earlier UTC instant, ``fold=0``).

The same rule drives :func:`matches`, :func:`fire_times`, :func:`next_fire_times`
and :class:`kongtask.cron.CronIndex`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

from kongtask.cron.types import ParsedCronItem, TimestampDigest
from kongtask.errors import ConfigurationError

__all__ = [
    "digest",
    "dow_of",
    "fire_times",
    "matches",
    "next_fire_times",
    "utc_minute",
    "wall_minutes_due",
    "zone",
]

UTC = UTC
MINUTE = timedelta(minutes=1)
_DAY = timedelta(days=1)
_HORIZON_DAYS = 146_097  # 400 Gregorian years: every day pattern repeats within this


@lru_cache(maxsize=512)
def zone(name: str) -> ZoneInfo:
    """Return the (cached) zone of that IANA name."""
    return ZoneInfo(name)


def utc_minute(when: datetime, name: str = "when") -> datetime:
    """Return ``when`` in UTC, truncated to the minute; naive datetimes are refused."""
    if not isinstance(when, datetime) or when.utcoffset() is None:
        raise ConfigurationError(
            f"{name} must be a timezone-aware datetime, got {when!r}", name=name, value=when
        )
    return when.astimezone(UTC).replace(second=0, microsecond=0)


def dow_of(day: date) -> int:
    """Cron day of week of a date: Sunday is 0."""
    return (day.weekday() + 1) % 7  # Monday is 0 in Python, 1 in cron


def digest(when: datetime) -> TimestampDigest:
    """The UTC minute, hour, date, month and day of week (Sunday 0) of ``when``."""
    t = utc_minute(when)
    return TimestampDigest(t.minute, t.hour, t.day, t.month, dow_of(t))


def wall_minutes_due(t: datetime, tz: ZoneInfo) -> list[datetime]:
    """The naive wall-clock minutes of ``tz`` that fire at UTC minute ``t``.

    Usually just the wall time of ``t``; nothing if ``t`` repeats an earlier wall time
    (fall back); the skipped minutes plus the wall time of ``t`` if ``t`` is the first
    minute after a gap (spring forward).
    """
    local = t.astimezone(tz)
    if local.fold:
        return []
    wall = local.replace(tzinfo=None)
    expected = (t - MINUTE).astimezone(tz).replace(tzinfo=None, fold=0) + MINUTE
    if wall <= expected:
        return [wall]
    skipped = int((wall - expected) / MINUTE)
    return [expected + i * MINUTE for i in range(skipped)] + [wall]


def _wall_matches(item: ParsedCronItem, wall: datetime) -> bool:
    return item.matches_fields(wall.minute, wall.hour, wall.day, wall.month, dow_of(wall))


def matches(item: ParsedCronItem, when: datetime) -> bool:
    """Whether ``item`` fires at the minute of ``when`` (an aware datetime).

    UTC fields for items without ``tz``; wall-clock fields with the DST rule of this
    module's docstring for items with one.
    """
    t = utc_minute(when)
    if item.options.tz is None:
        return item.matches_fields(t.minute, t.hour, t.day, t.month, dow_of(t))
    return any(_wall_matches(item, wall) for wall in wall_minutes_due(t, zone(item.options.tz)))


def _fire_instant(wall: datetime, tz: ZoneInfo) -> datetime:
    """The UTC minute at which a matching wall time fires (see the DST rule)."""
    instant = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
    if instant.astimezone(tz).replace(tzinfo=None) == wall:
        return instant
    # ``wall`` lies in a gap: find the first minute whose wall clock is past it.
    low = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)  # before the gap
    high = instant  # after the gap
    while high - low > MINUTE:
        middle = low + ((high - low) // MINUTE // 2) * MINUTE
        if middle.astimezone(tz).replace(tzinfo=None) > wall:
            high = middle
        else:
            low = middle
    return high


def _walls_of_day(item: ParsedCronItem, day: date) -> Iterator[datetime]:
    if item.matches_day(day.day, day.month, dow_of(day)):
        for hour in item.hours:
            for minute in item.minutes:
                yield datetime(day.year, day.month, day.day, hour, minute)


def _days_from(first: date, count: int) -> Iterator[date]:
    day = first
    for _ in range(count):
        yield day
        if day == date.max:
            return
        day += _DAY


def _iter_fire_times(
    item: ParsedCronItem, start: datetime, days: int = _HORIZON_DAYS
) -> Iterator[datetime]:
    """Fire times ``>= start`` (a UTC minute) in increasing order, over ``days`` days."""
    if item.options.tz is None:
        for day in _days_from(start.date(), days):
            for wall in _walls_of_day(item, day):
                instant = wall.replace(tzinfo=UTC)
                if instant >= start:
                    yield instant
        return
    tz = zone(item.options.tz)
    first_day = start.astimezone(tz).date()
    first_day = first_day - _DAY if first_day > date.min else first_day
    previous: datetime | None = None
    for day in _days_from(first_day, days + 1):
        for instant in sorted(_fire_instant(w, tz) for w in _walls_of_day(item, day)):
            if instant >= start and instant != previous:
                previous = instant
                yield instant


def _ceil_minute(when: datetime, name: str) -> datetime:
    t = utc_minute(when, name)
    return t if t == when else t + MINUTE


def fire_times(item: ParsedCronItem, start: datetime, end: datetime) -> list[datetime]:
    """The UTC minutes in ``[start, end)`` at which ``item`` fires, in order."""
    first = _ceil_minute(start, "start")
    stop = utc_minute(end, "end") + MINUTE  # a bound for the day scan, not the filter
    days = (stop - first) // _DAY + 3
    return list(itertools.takewhile(lambda t: t < end, _iter_fire_times(item, first, days)))


def next_fire_times(item: ParsedCronItem, after: datetime, n: int) -> list[datetime]:
    """The next ``n`` UTC minutes strictly after ``after`` at which ``item`` fires.

    Fewer are returned only when the pattern never fires (``0 0 31 2 *``) within
    400 years.
    """
    if n < 0:
        raise ConfigurationError(f"n must be >= 0, got {n}", name="n", value=n)
    first = utc_minute(after, "after") + MINUTE
    return list(itertools.islice(_iter_fire_times(item, first), n))
