"""The values of the cron package: options, programmatic and parsed items, digests.

They are frozen so a parsed crontab can be shared between actors without copying;
a ``ParsedCronItem`` also carries bitmasks derived from its fields so matching a
minute costs a few integer operations.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any, NamedTuple

__all__ = [
    "DEFAULT_CONDITION_TIMEOUT_S",
    "FIELDS",
    "MAX_CONDITION_TIMEOUT_S",
    "Condition",
    "CronField",
    "CronItem",
    "CronItemOptions",
    "Firing",
    "ParsedCronItem",
    "TimestampDigest",
]


class CronField(NamedTuple):
    """One of the five time fields: its name in error messages and its value range."""

    label: str
    low: int
    high: int


#: The five fields in crontab order; labels are the ones graphile-worker's messages use.
FIELDS: tuple[CronField, ...] = (
    CronField("minutes", 0, 59),
    CronField("hours", 0, 23),
    CronField("dates", 1, 31),
    CronField("months", 1, 12),
    CronField("days of week", 0, 6),
)


class TimestampDigest(NamedTuple):
    """The parts of a minute that a cron pattern looks at (``dow``: Sunday is 0).

    ``str()`` gives the seed's form, two digits each for minute, hour, date, month and
    weekday: ``"00:04:01:01:01"`` for Monday 2024-01-01 04:00 UTC.
    """

    min: int
    hour: int
    date: int
    month: int
    dow: int

    def __str__(self) -> str:
        return ":".join(f"{value:02d}" for value in self)


@dataclass(frozen=True, slots=True)
class Firing:
    """One (item, minute) about to be scheduled, as a ``condition`` callable sees it."""

    identifier: str
    task: str
    scheduled_at: datetime
    backfilled: bool
    payload: Mapping[str, Any] | None


#: A programmatic item's condition: called when a minute is scheduled; False skips it.
Condition = Callable[[Firing], bool]
#: How long a condition may take before its firing is skipped, unless the item says.
DEFAULT_CONDITION_TIMEOUT_S = 5.0
#: The longest deadline an item may give its condition: the minute's decisions,
#: and so the next minute, must not wait longer than this.
MAX_CONDITION_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class CronItemOptions:
    """How jobs for a cron item are made.

    ``backfill_period`` is how far back missed minutes are scheduled at startup;
    ``job_key_mode`` becomes ``"replace"`` when a truthy ``job_key`` comes without a
    mode, as in graphile-worker. ``tz`` (an IANA zone name) is kongtask-only: the
    item's fields are then read as wall-clock time in that zone. ``no_overlap`` and
    ``skip_dates`` are kongtask's declarative rules: skip a firing while the previous
    firing's job is still queued or running, or on those dates (in the item's zone).
    """

    backfill_period: timedelta = timedelta(0)
    max_attempts: int | None = None
    queue_name: str | None = None
    priority: int | None = None
    job_key: str | None = None
    job_key_mode: str | None = None
    tz: str | None = None
    no_overlap: bool = False
    skip_dates: tuple[date, ...] = ()

    def __post_init__(self) -> None:
        if self.job_key and not self.job_key_mode:
            object.__setattr__(self, "job_key_mode", "replace")


@dataclass(frozen=True, slots=True)
class CronItem:
    """A cron item given in code rather than in a crontab file.

    ``match`` is a five-field pattern or (kongtask-only) a nickname such as
    ``"@daily"``; ``options`` is a :class:`CronItemOptions` or a mapping of its field
    names (graphile-worker's camelCase names are accepted too, ``backfillPeriod`` in
    milliseconds). ``identifier`` defaults to ``task`` and ``payload`` to ``{}``.
    ``condition`` is called off the scheduling thread for each firing; one that has
    not answered within ``condition_timeout_s`` (default
    :data:`DEFAULT_CONDITION_TIMEOUT_S`, at most :data:`MAX_CONDITION_TIMEOUT_S`)
    skips that firing.
    """

    task: str
    match: str
    options: CronItemOptions | Mapping[str, Any] | None = None
    payload: Mapping[str, Any] | None = None
    identifier: str | None = None
    condition: Condition | None = None
    condition_timeout_s: float | None = None


def _mask(values: tuple[int, ...]) -> int:
    mask = 0
    for value in values:
        mask |= 1 << value
    return mask


@dataclass(frozen=True, slots=True)
class ParsedCronItem:
    """A validated cron item, ready to match minutes.

    The five value tuples are sorted and de-duplicated (day of week 7 is stored as
    0). Build these with the parser functions, which validate; the bitmasks and the
    day-rule flags are derived here. ``source_line`` (the crontab line, if any) does
    not take part in equality, so a rendered and re-parsed item compares equal.
    """

    identifier: str
    task: str
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    dates: tuple[int, ...]
    months: tuple[int, ...]
    dows: tuple[int, ...]
    options: CronItemOptions = field(default_factory=CronItemOptions)
    payload: dict[str, Any] | None = field(default=None, hash=False)
    source_line: int | None = field(default=None, compare=False)
    #: kongtask-only syntax the item uses (a Node worker would refuse its line).
    extensions: tuple[str, ...] = field(default=(), compare=False)
    #: A programmatic item's condition (see :class:`Firing`).
    condition: Condition | None = field(default=None, compare=False, repr=False)
    #: How long the condition may take before the firing is skipped.
    condition_timeout_s: float = field(
        default=DEFAULT_CONDITION_TIMEOUT_S, compare=False, repr=False
    )
    #: Where the item came from: ``"crontab"``, ``"code"`` or ``"stored"``.
    origin: str = field(default="crontab", compare=False)
    minute_mask: int = field(init=False, repr=False, compare=False)
    hour_mask: int = field(init=False, repr=False, compare=False)
    date_mask: int = field(init=False, repr=False, compare=False)
    month_mask: int = field(init=False, repr=False, compare=False)
    dow_mask: int = field(init=False, repr=False, compare=False)
    #: True when the day of month is restricted (fewer than all 31 dates).
    dom_restricted: bool = field(init=False, repr=False, compare=False)
    #: True when the day of week is restricted (fewer than all 7 days).
    dow_restricted: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        setattr_ = object.__setattr__
        setattr_(self, "minute_mask", _mask(self.minutes))
        setattr_(self, "hour_mask", _mask(self.hours))
        setattr_(self, "date_mask", _mask(self.dates))
        setattr_(self, "month_mask", _mask(self.months))
        setattr_(self, "dow_mask", _mask(self.dows))
        setattr_(self, "dom_restricted", len(self.dates) != 31)
        setattr_(self, "dow_restricted", len(self.dows) != 7)

    @property
    def tz(self) -> str | None:
        """The item's time zone name, or ``None`` for UTC."""
        return self.options.tz

    def matches_fields(self, minute: int, hour: int, date: int, month: int, dow: int) -> bool:
        """Whether a wall-clock minute matches the fields, with the classic day rule.

        Minute, hour and month must match; if both day fields are restricted a match
        on either suffices, otherwise only the restricted one (if any) is checked.
        """
        if not ((self.minute_mask >> minute) & 1 and (self.hour_mask >> hour) & 1):
            return False
        return self.matches_day(date, month, dow)

    def matches_day(self, date: int, month: int, dow: int) -> bool:
        """Whether some minute of this calendar day can match (month and the day rule)."""
        if not (self.month_mask >> month) & 1:
            return False
        date_ok = bool((self.date_mask >> date) & 1)
        dow_ok = bool((self.dow_mask >> dow) & 1)
        if self.dom_restricted and self.dow_restricted:
            return date_ok or dow_ok
        return date_ok and dow_ok
