"""The cron matcher: UTC matching, the day rule, the DST rule, the bulk index."""

# Tables of exact messages and DST cases read best one case per line.
# ruff: noqa: E501

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from croniter import CroniterBadDateError, croniter
from hypothesis import given, settings
from hypothesis import strategies as st

from kongtask.cron import (
    CronIndex,
    ParsedCronItem,
    TimestampDigest,
    digest,
    fire_times,
    matches,
    next_fire_times,
    parse_cron_item,
    parse_crontab,
)
from kongtask.errors import ConfigurationError

UTC = UTC
MINUTE = timedelta(minutes=1)


def _field(low: int, high: int) -> st.SearchStrategy[str]:
    number = st.integers(low, high).map(str)
    span = st.tuples(st.integers(low, high - 1), st.integers(1, high - low)).map(
        lambda p: f"{p[0]}-{min(high, p[0] + p[1])}"
    )
    star = st.one_of(st.just("*"), st.integers(1, high + 1).map(lambda n: f"*/{n}"))
    return st.lists(st.one_of(number, span, star), min_size=1, max_size=3).map(",".join)


PATTERNS = st.tuples(_field(0, 59), _field(0, 23), _field(1, 31), _field(1, 12), _field(0, 7)).map(
    " ".join
)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def item(pattern: str, tz: str | None = None) -> ParsedCronItem:
    return parse_cron_item({"task": "t", "match": pattern, "options": {"tz": tz}})


def minutes_between(start: datetime, end: datetime) -> list[datetime]:
    return [start + i * MINUTE for i in range(int((end - start) / MINUTE))]


def test_digest() -> None:
    berlin = datetime(2024, 3, 31, 3, 7, 42, tzinfo=ZoneInfo("Europe/Berlin"))
    assert digest(berlin) == TimestampDigest(min=7, hour=1, date=31, month=3, dow=0)
    with pytest.raises(ConfigurationError, match="when must be a timezone-aware datetime"):
        digest(datetime(2024, 1, 1))


@pytest.mark.parametrize(
    ("pattern", "when", "expected"),
    [
        ("0 4 * * *", utc(2024, 1, 8, 4, 0), True),
        ("0 4 * * *", utc(2024, 1, 8, 4, 0, 59), True),
        ("0 4 * * *", utc(2024, 1, 8, 4, 1), False),
        # both day fields restricted: either matches (2024-01-08 is a Monday)
        ("0 0 1 * 1", utc(2024, 1, 8), True),
        ("0 0 1 * 1", utc(2024, 1, 1), True),
        ("0 0 1 * 1", utc(2024, 1, 2), False),
        # only one restricted: only it counts
        ("0 0 * * 1", utc(2024, 1, 1), True),
        ("0 0 * * 1", utc(2024, 1, 2), False),
        ("0 0 2 * *", utc(2024, 1, 2), True),
        ("0 0 2 * *", utc(2024, 1, 1), False),
        # 1-31 and */1 are unrestricted DOM; 0-7 and 1-7 unrestricted DOW
        ("0 0 1-31 * 1", utc(2024, 1, 2), False),
        ("0 0 */1 * 1", utc(2024, 1, 1), True),
        ("0 0 5 * 0-7", utc(2024, 1, 4), False),
        ("0 0 5 * 1-7", utc(2024, 1, 5), True),
        ("0 0 * * 7", utc(2024, 1, 7), True),
        ("0 0 * 2 *", utc(2024, 1, 7), False),
    ],
)
def test_utc_matching(pattern: str, when: datetime, expected: bool) -> None:
    assert matches(item(pattern), when) is expected


# (pattern, zone, [start, end) in UTC, expected UTC fire times)
DST_TABLE = [
    # Europe/Berlin spring forward 2024-03-31 01:00Z: 02:00 CET -> 03:00 CEST
    ("30 2 * * *", "Europe/Berlin", utc(2024, 3, 30), utc(2024, 4, 2),
     [utc(2024, 3, 30, 1, 30), utc(2024, 3, 31, 1, 0), utc(2024, 4, 1, 0, 30)]),
    ("0,30 2,3 * * *", "Europe/Berlin", utc(2024, 3, 31), utc(2024, 3, 31, 3),
     [utc(2024, 3, 31, 1, 0), utc(2024, 3, 31, 1, 30)]),
    ("0 3 * * *", "Europe/Berlin", utc(2024, 3, 31), utc(2024, 3, 31, 3), [utc(2024, 3, 31, 1)]),
    # Europe/Berlin fall back 2024-10-27 01:00Z: 03:00 CEST -> 02:00 CET
    ("30 2 * * *", "Europe/Berlin", utc(2024, 10, 26), utc(2024, 10, 29),
     [utc(2024, 10, 26, 0, 30), utc(2024, 10, 27, 0, 30), utc(2024, 10, 28, 1, 30)]),
    ("*/30 * * * *", "Europe/Berlin", utc(2024, 10, 27, 0), utc(2024, 10, 27, 2, 1),
     [utc(2024, 10, 27, 0, 0), utc(2024, 10, 27, 0, 30), utc(2024, 10, 27, 2, 0)]),
    # America/New_York spring 2024-03-10 07:00Z (02:00 EST -> 03:00 EDT)
    ("30 2 * * *", "America/New_York", utc(2024, 3, 9), utc(2024, 3, 12),
     [utc(2024, 3, 9, 7, 30), utc(2024, 3, 10, 7, 0), utc(2024, 3, 11, 6, 30)]),
    # ... fall 2024-11-03 06:00Z (02:00 EDT -> 01:00 EST): 01:30 repeats, 02:30 does not
    ("30 1 * * *", "America/New_York", utc(2024, 11, 3), utc(2024, 11, 4), [utc(2024, 11, 3, 5, 30)]),
    ("30 2 * * *", "America/New_York", utc(2024, 11, 3), utc(2024, 11, 4), [utc(2024, 11, 3, 7, 30)]),
    # Australia/Lord_Howe shifts by 30 minutes: 02:00 -> 02:30 on 2024-10-06 (15:30Z the day before)
    ("15 2 * * *", "Australia/Lord_Howe", utc(2024, 10, 5), utc(2024, 10, 6), [utc(2024, 10, 5, 15, 30)]),
    ("45 2 * * *", "Australia/Lord_Howe", utc(2024, 10, 5), utc(2024, 10, 6), [utc(2024, 10, 5, 15, 45)]),
    # ... and 02:00 -> 01:30 on 2024-04-07 (15:00Z the day before): 01:45 fires once
    ("45 1 * * *", "Australia/Lord_Howe", utc(2024, 4, 6), utc(2024, 4, 7), [utc(2024, 4, 6, 14, 45)]),
]  # fmt: skip


@pytest.mark.parametrize(("pattern", "tz", "start", "end", "expected"), DST_TABLE)
def test_dst_table(pattern: str, tz: str, start: datetime, end: datetime, expected: list) -> None:
    cron = item(pattern, tz)
    assert fire_times(cron, start, end) == expected
    assert [t for t in minutes_between(start, end) if matches(cron, t)] == expected
    assert [t for t in minutes_between(start, end) if CronIndex([cron]).due(t)] == expected


def test_fire_times_bounds_and_next() -> None:
    cron = item("0 0 29 2 *")
    assert next_fire_times(cron, utc(2024, 2, 29), 2) == [utc(2028, 2, 29), utc(2032, 2, 29)]
    assert next_fire_times(cron, utc(2024, 2, 28, 23, 59, 30), 1) == [utc(2024, 2, 29)]
    assert next_fire_times(item("0 0 31 2 *"), utc(2024, 1, 1), 3) == []
    every = item("* * * * *")
    assert fire_times(every, utc(2024, 1, 1, 0, 0, 30), utc(2024, 1, 1, 0, 3)) == [
        utc(2024, 1, 1, 0, 1),
        utc(2024, 1, 1, 0, 2),
    ]
    hourly = item("@hourly", "Asia/Kolkata")
    assert next_fire_times(hourly, utc(2024, 1, 1), 2) == [
        utc(2024, 1, 1, 0, 30),
        utc(2024, 1, 1, 1, 30),
    ]


def _croniter_expression(cron: ParsedCronItem) -> str:
    spans = (
        (cron.minutes, 60),
        (cron.hours, 24),
        (cron.dates, 31),
        (cron.months, 12),
        (cron.dows, 7),
    )
    return " ".join("*" if len(v) == n else ",".join(map(str, v)) for v, n in spans)


MINUTES = st.datetimes(datetime(2000, 1, 1), datetime(2099, 12, 31)).map(
    lambda d: d.replace(second=0, microsecond=0, tzinfo=UTC)
)


@settings(max_examples=500)
@given(pattern=PATTERNS, when=MINUTES)
def test_matches_agrees_with_croniter(pattern: str, when: datetime) -> None:
    # croniter ORs the day fields when both are not "*", so full fields are written as
    # "*" (graphile-worker counts 1-31 and 0-7 as unrestricted).
    cron = item(pattern)
    assert matches(cron, when) is croniter.match(_croniter_expression(cron), when, day_or=True)


@settings(max_examples=500)
@given(pattern=PATTERNS, when=MINUTES)
def test_next_fire_times_agree_with_croniter(pattern: str, when: datetime) -> None:
    cron = item(pattern)
    try:
        expected = [croniter(_croniter_expression(cron), when, day_or=True).get_next(datetime)]
    except CroniterBadDateError:  # a date that never comes, such as February 30
        expected = []
    assert next_fire_times(cron, when, 1) == expected


DST_DAYS = [
    ("Europe/Berlin", utc(2024, 3, 30)),
    ("Europe/Berlin", utc(2024, 10, 26)),
    ("America/New_York", utc(2024, 3, 9, 12)),
    ("America/New_York", utc(2024, 11, 2, 12)),
    ("Australia/Lord_Howe", utc(2024, 10, 5)),
    ("Australia/Lord_Howe", utc(2024, 4, 6)),
]
SMALL_HOURS = st.lists(st.integers(0, 4), min_size=1, max_size=3).map(
    lambda hs: ",".join(map(str, hs))
)


@settings(max_examples=60, deadline=None)
@given(
    minutes=st.sampled_from(["0", "30", "*/15", "15,45", "59", "0-2"]),
    hours=SMALL_HOURS,
    place=st.sampled_from(DST_DAYS),
)
def test_dst_rule_properties(minutes: str, hours: str, place: tuple[str, datetime]) -> None:
    tz, start = place
    end = start + timedelta(days=2)
    cron = item(f"{minutes} {hours} * * *", tz)
    fired = fire_times(cron, start, end)
    assert fired == [t for t in minutes_between(start, end) if matches(cron, t)]
    # every wall time the fields name fires exactly once per local day
    per_day = len(cron.minutes) * len(cron.hours)
    zone = ZoneInfo(tz)
    days = {t.astimezone(zone).date() for t in minutes_between(start, end)}
    for day in sorted(days)[1:-1]:  # whole local days inside the window
        local = [t for t in fired if t.astimezone(zone).date() == day]
        assert len(local) <= per_day  # gaps may merge several wall times into one firing
        walls = {
            (h, m)
            for h in cron.hours
            for m in cron.minutes
            if _exists(datetime(day.year, day.month, day.day, h, m), zone)
        }
        assert {(t.astimezone(zone).hour, t.astimezone(zone).minute) for t in local} >= walls


def _exists(wall: datetime, zone: ZoneInfo) -> bool:
    return wall.replace(tzinfo=zone).astimezone(UTC).astimezone(zone).replace(tzinfo=None) == wall


@settings(max_examples=40, deadline=None)
@given(
    patterns=st.lists(
        st.tuples(PATTERNS, st.sampled_from([None, None, "Europe/Berlin", "Australia/Lord_Howe"])),
        min_size=1,
        max_size=40,
    ),
    whens=st.lists(
        st.one_of(MINUTES, st.sampled_from(DST_DAYS).map(lambda p: p[1] + timedelta(hours=14))),
        max_size=20,
    ),
)
def test_index_agrees_with_matches(patterns: list, whens: list[datetime]) -> None:
    items = [item(p, tz) for p, tz in patterns]
    index = CronIndex(items)
    assert len(index) == len(items)
    for start in whens:
        for t in (start, start + 30 * MINUTE, start + 60 * MINUTE):
            assert index.due(t) == [i for i in items if matches(i, t)]


def test_index_order_and_crontab() -> None:
    items = parse_crontab(
        "* * * * * a\n0 * * * * b ?tz=Europe/Berlin\n* * * * 1 c\n0 0 1 * 1 d\n30 2 * * * e ?tz=Europe/Berlin"
    )
    index = CronIndex(items)
    assert [i.identifier for i in index.due(utc(2024, 1, 1))] == ["a", "b", "c", "d"]
    assert [i.identifier for i in index.due(utc(2024, 3, 31, 1))] == ["a", "b", "e"]
    assert index.items == tuple(items)
