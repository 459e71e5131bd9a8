"""Timestamps beyond Python's datetime: PostgreSQL's ``±infinity`` and years outside 1..9999.

A timestamptz column holds anything from 4713 BC to the year 294276, plus
``-infinity`` and ``infinity`` ("as soon as possible" and "never" are common
sentinels in applications sharing the queue); Python's datetime holds years
1 to 9999 and psycopg refuses to load the rest, failing the whole statement
(a claim whose batch then stayed locked, every listing and page showing such
a row). So the connections kongtask reads rows through load timestamptz with
:class:`TimestamptzLoader` (see :func:`tolerate_timestamps`): an ordinary
datetime for every instant Python can hold, whatever the session's time zone,
and an :class:`OutOfRangeTimestamp` for the others. The claim, a hot path,
keeps psycopg's own loader and reloads only an answer it refused
(:func:`load_rows_tolerating`).

The other way, :func:`unwritable` names the times kongtask refuses to write
(beyond year 9999 or before year 1 in UTC), so it never stores a value a
reader without this loader could not load.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta, tzinfo
from typing import Any, Self

import psycopg
from psycopg import abc, postgres
from psycopg.abc import AdaptContext, Buffer
from psycopg.adapt import Loader
from psycopg.pq import Format

__all__ = [
    "WRITABLE_YEARS",
    "OutOfRangeTimestamp",
    "TimestamptzLoader",
    "format_utc",
    "load_rows_tolerating",
    "psycopg_timestamps",
    "tolerate_timestamps",
    "unwritable",
]

#: What kongtask writes, said in every refusal.
WRITABLE_YEARS = "kongtask writes only times in the years 1 to 9999 (UTC)"

_TIMESTAMPTZ_OID = postgres.types["timestamptz"].oid


def _standard_loader() -> type[abc.Loader]:
    """psycopg's own loader (its C version with psycopg_binary): it does the work in range."""
    loader = psycopg.adapters.get_loader(_TIMESTAMPTZ_OID, Format.TEXT)
    assert loader is not None, "psycopg always has a timestamptz loader"
    return loader


_STANDARD_LOADER = _standard_loader()

# PostgreSQL's ISO output: any number of year digits, an offset that may carry
# seconds (local mean time before 1900), " BC" for years before 1.
_ISO = re.compile(
    r"(\d+)-(\d+)-(\d+)[ T](\d+):(\d+):(\d+)(?:\.(\d+))?"
    r"([-+])(\d+)(?::(\d+))?(?::(\d+))?( BC)?"
)

_DAY_US = 86_400 * 10**6
# The Gregorian calendar repeats every 400 years, which are this many days.
_CYCLE_DAYS = 146_097
# Microseconds from 0001-01-01T00:00 UTC to the last instant Python can hold.
_LAST_US = (date.max.toordinal() * _DAY_US) - 1
_EARLIEST = datetime.min.replace(tzinfo=UTC)
_LATEST = datetime.max.replace(tzinfo=UTC)


class OutOfRangeTimestamp(datetime):
    """A timestamptz Python's datetime cannot hold: ``-infinity``, ``infinity``, year 0 or 10000.

    It compares, sorts and subtracts as the nearest instant Python can hold
    (``datetime.min`` or ``datetime.max`` in UTC), so "is it due" and "how
    long ago" still work, and it prints as what it is: ``str()``,
    ``isoformat()`` and ``strftime()`` give :attr:`text` (``-infinity``,
    ``infinity``, or the ISO time in UTC such as ``10000-01-01T04:00:00+00:00``
    or ``0001-12-31T23:00:00+00:00 BC``). ``astimezone()`` returns it
    unchanged. Arithmetic gives ordinary datetimes. kongtask refuses to write
    one (see :func:`unwritable`).
    """

    __slots__ = ("_text",)

    _text: str

    @classmethod
    def make(cls, text: str, *, after: bool) -> OutOfRangeTimestamp:
        """The value for ``text``, a time after year 9999 when ``after`` else before year 1."""
        edge = _LATEST if after else _EARLIEST
        value = datetime.__new__(cls, *edge.timetuple()[:6], edge.microsecond, tzinfo=UTC)
        value._text = text
        return value

    @property
    def text(self) -> str:
        """PostgreSQL's value: ``-infinity``, ``infinity`` or the ISO time in UTC."""
        return self._own_text() or datetime.isoformat(self)

    def _own_text(self) -> str | None:
        # Unset on values datetime derives from this one (arithmetic, replace()):
        # those are ordinary instants and behave as such.
        return getattr(self, "_text", None)

    def isoformat(self, sep: str = "T", timespec: str = "auto") -> str:
        return self._own_text() or super().isoformat(sep, timespec)

    def strftime(self, format: str) -> str:
        return self._own_text() or super().strftime(format)

    def astimezone(self, tz: tzinfo | None = None) -> Self:
        return self if self._own_text() else super().astimezone(tz)

    def __str__(self) -> str:
        return self._own_text() or super().__str__()

    def __repr__(self) -> str:
        text = self._own_text()
        return f"OutOfRangeTimestamp({text!r})" if text else super().__repr__()

    def __reduce_ex__(self, protocol: Any) -> Any:
        text = self._own_text()
        if text is None:
            return super().__reduce_ex__(protocol)
        return (_restore, (text, self >= _LATEST))


def _restore(text: str, after: bool) -> OutOfRangeTimestamp:
    """Unpickle an :class:`OutOfRangeTimestamp`."""
    return OutOfRangeTimestamp.make(text, after=after)


class TimestamptzLoader(Loader):
    """psycopg's timestamptz loader, plus the values it refuses (see the module docstring)."""

    def __init__(self, oid: int, context: AdaptContext | None = None) -> None:
        super().__init__(oid, context)
        self._standard = _STANDARD_LOADER(oid, context)

    def load(self, data: Buffer) -> datetime:
        try:
            value: datetime = self._standard.load(data)
            return value
        except psycopg.DataError:
            found = parse_out_of_range(bytes(data).decode("ascii", "replace"))
            if found is None:
                raise
            return found


def tolerate_timestamps(context: AdaptContext) -> None:
    """Load timestamptz on ``context`` (a connection or cursor) with :class:`TimestamptzLoader`.

    Per context, never globally: an application's own connections keep
    psycopg's behaviour.
    """
    context.adapters.register_loader(_TIMESTAMPTZ_OID, TimestamptzLoader)


def psycopg_timestamps(context: AdaptContext) -> None:
    """Load timestamptz on ``context`` with psycopg's own loader, which refuses those values.

    For a hot path on a tolerant connection: each value then costs one C call
    instead of two calls and a Python frame (the claim loads four per job);
    the caller falls back to :func:`load_rows_tolerating` if a row is refused.
    """
    context.adapters.register_loader(_TIMESTAMPTZ_OID, _STANDARD_LOADER)


def load_rows_tolerating(cursor: psycopg.Cursor[Any]) -> list[tuple[Any, ...] | Exception]:
    """The rows of ``cursor``'s result, loaded value by value, timestamps tolerated.

    The slow path for a result psycopg refused as a whole: a row that still
    cannot be loaded (a value no loader reads) comes back as the exception
    its loader raised, in its place, so the caller can deal with it alone.
    """
    result = cursor.pgresult
    assert result is not None, "the cursor has a result"
    loaders: list[Any] = []
    for column in range(result.nfields):
        oid = result.ftype(column)
        loader = (
            TimestamptzLoader
            if oid == _TIMESTAMPTZ_OID
            else cursor.adapters.get_loader(oid, Format(result.fformat(column)))
        )
        loaders.append(None if loader is None else loader(oid, cursor).load)
    rows: list[tuple[Any, ...] | Exception] = []
    for index in range(result.ntuples):
        try:
            rows.append(
                tuple(
                    _load_value(result.get_value(index, column), load)
                    for column, load in enumerate(loaders)
                )
            )
        except Exception as exc:  # whatever a loader raised about this row's data
            rows.append(exc)
    return rows


def _load_value(raw: Buffer | None, load: Any) -> Any:
    if raw is None:
        return None
    return bytes(raw).decode() if load is None else load(raw)


def parse_out_of_range(text: str) -> datetime | None:
    """The value of a timestamptz text psycopg refused, or None if it is not one.

    An instant Python can hold after all (the session's time zone put its
    local year at 10000 or before 1) comes back as an ordinary datetime in UTC.
    """
    if text in ("infinity", "-infinity"):
        return OutOfRangeTimestamp.make(text, after=text == "infinity")
    match = _ISO.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, sign, oh, om, os, bc = match.groups()
    # Year 1 BC is year 0, 2 BC is -1 (ISO 8601's astronomical numbering).
    astronomical = 1 - int(year) if bc else int(year)
    try:
        days = _days_before(astronomical, int(month), int(day))
    except ValueError:
        return None
    offset_s = int(oh) * 3600 + int(om or 0) * 60 + int(os or 0)
    local_s = days * 86_400 + int(hour) * 3600 + int(minute) * 60 + int(second)
    utc_us = (local_s - (offset_s if sign == "+" else -offset_s)) * 10**6
    utc_us += int((fraction or "0").ljust(6, "0")[:6])
    if 0 <= utc_us <= _LAST_US:
        return _EARLIEST + timedelta(microseconds=utc_us)
    return OutOfRangeTimestamp.make(_utc_text(utc_us), after=utc_us > 0)


def _days_before(year: int, month: int, day: int) -> int:
    """Days from 0001-01-01 to this date of the proleptic Gregorian calendar, any year."""
    cycles, within = divmod(year - 1, 400)
    return date(within + 1, month, day).toordinal() - 1 + cycles * _CYCLE_DAYS


def _utc_text(utc_us: int) -> str:
    """ISO 8601 text in UTC for microseconds since 0001-01-01T00:00 UTC, any year."""
    days, day_us = divmod(utc_us, _DAY_US)
    cycles, within = divmod(days, _CYCLE_DAYS)
    when = datetime.combine(date.fromordinal(within + 1), datetime.min.time(), UTC)
    when += timedelta(microseconds=day_us)
    year = when.year + cycles * 400
    rest = when.isoformat()[4:]  # "-MM-DDTHH:MM:SS[.ffffff]+00:00"
    return f"{year:04d}{rest}" if year >= 1 else f"{1 - year:04d}{rest} BC"


def format_utc(value: datetime, fmt: str) -> str:
    """``value`` in UTC through ``strftime(fmt)``; an :class:`OutOfRangeTimestamp` as its text."""
    if isinstance(value, OutOfRangeTimestamp):
        return value.text
    return value.astimezone(UTC).strftime(fmt)


def unwritable(value: datetime) -> str | None:
    """Why kongtask must not write ``value`` (an aware datetime), or None when it may.

    A time after year 9999 or before year 1 in UTC (``9999-12-31T23:00-05:00``
    is year 10000 in UTC) is stored by PostgreSQL but cannot be loaded by
    psycopg, nor by kongtask's own readers before they tolerated it.
    """
    if isinstance(value, OutOfRangeTimestamp):
        return f"{value.text} is outside the years 1 to 9999; {WRITABLE_YEARS}"
    try:
        value.astimezone(UTC)
    except OverflowError:
        side = "after year 9999" if value.year > 1 else "before year 1"
        return f"{value.isoformat()} is {side} in UTC; {WRITABLE_YEARS}"
    return None
