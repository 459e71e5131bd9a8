"""Timestamps beyond Python's datetime: reading PostgreSQL's text, rendering, refusing writes."""

from __future__ import annotations

import copy
import pickle
from datetime import UTC, datetime, timedelta, timezone

import pytest

from kongtask.db.timestamps import (
    OutOfRangeTimestamp,
    format_utc,
    parse_out_of_range,
    unwritable,
)

EARLIEST = datetime.min.replace(tzinfo=UTC)
LATEST = datetime.max.replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "shown", "after"),
    [
        ("infinity", "infinity", True),
        ("-infinity", "-infinity", False),
        ("10000-01-01 00:00:00+00", "10000-01-01T00:00:00+00:00", True),
        # Another session time zone: PostgreSQL prints local time, kongtask shows UTC.
        ("10000-01-01 09:30:00+09", "10000-01-01T00:30:00+00:00", True),
        ("294277-01-01 08:59:59.5+09", "294276-12-31T23:59:59.500000+00:00", True),
        ("0001-12-31 23:00:00+00 BC", "0001-12-31T23:00:00+00:00 BC", False),
        ("0044-03-15 12:00:00+00 BC", "0044-03-15T12:00:00+00:00 BC", False),
        # Local mean time offsets carry seconds.
        ("4713-01-01 09:18:59+09:18:59 BC", "4713-01-01T00:00:00+00:00 BC", False),
    ],
)
def test_values_python_cannot_hold(text: str, shown: str, after: bool) -> None:
    value = parse_out_of_range(text)
    assert isinstance(value, OutOfRangeTimestamp)
    assert value.text == str(value) == value.isoformat() == shown
    assert value.strftime("%Y-%m-%d") == format_utc(value, "%Y") == shown
    assert value.astimezone(timezone(timedelta(hours=-5))) is value
    assert value == (LATEST if after else EARLIEST)
    assert repr(value) == f"OutOfRangeTimestamp({shown!r})"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Local year 10000 in Tokyo is still 9999 in UTC.
        ("10000-01-01 08:59:59+09", datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)),
        # Local year 1 BC in New York (LMT) is year 1 in UTC.
        ("0001-12-31 19:03:58-04:56:02 BC", EARLIEST),
        ("0001-12-31 20:00:00-05 BC", datetime(1, 1, 1, 1, tzinfo=UTC)),
    ],
)
def test_instants_python_can_hold_come_back_as_datetimes(text: str, expected: datetime) -> None:
    value = parse_out_of_range(text)
    assert type(value) is datetime
    assert value == expected


@pytest.mark.parametrize(
    "text", ["", "garbage", "12/31/9999 23:00:00 PST", "10000-13-01 00:00:00+00"]
)
def test_other_text_is_not_taken_for_a_timestamp(text: str) -> None:
    assert parse_out_of_range(text) is None


def test_order_and_arithmetic_follow_the_nearest_instant() -> None:
    never = parse_out_of_range("infinity")
    asap = parse_out_of_range("-infinity")
    assert asap is not None and never is not None
    now = datetime.now(UTC)
    assert asap < now < never
    assert sorted([never, now, asap]) == [asap, now, never]
    assert never - now > timedelta(days=365 * 7000)
    earlier = never - timedelta(days=1)
    assert str(earlier) == "9999-12-30 23:59:59.999999+00:00"  # an ordinary instant again


def test_survives_pickle_and_copy() -> None:
    for text in ("infinity", "-infinity", "10000-01-01 00:00:00+00"):
        value = parse_out_of_range(text)
        assert value is not None
        for clone in (pickle.loads(pickle.dumps(value)), copy.deepcopy(value)):
            assert isinstance(clone, OutOfRangeTimestamp)
            assert clone.text == value.text and clone == value


def test_format_utc_of_ordinary_datetimes() -> None:
    when = datetime(2030, 1, 1, 9, tzinfo=timezone(timedelta(hours=2)))
    assert format_utc(when, "%Y-%m-%d %H:%M UTC") == "2030-01-01 07:00 UTC"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (
            datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-5))),
            "9999-12-31T23:00:00-05:00 is after year 9999 in UTC",
        ),
        (
            datetime(1, 1, 1, 1, tzinfo=timezone(timedelta(hours=5))),
            "0001-01-01T01:00:00+05:00 is before year 1 in UTC",
        ),
        (OutOfRangeTimestamp.make("infinity", after=True), "infinity is outside the years"),
    ],
)
def test_unwritable_times(value: datetime, reason: str) -> None:
    refusal = unwritable(value)
    assert refusal is not None and refusal.startswith(reason)
    assert "kongtask writes only times in the years 1 to 9999 (UTC)" in refusal


@pytest.mark.parametrize(
    "value",
    [
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=1))),
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(2030, 6, 1, tzinfo=timezone(timedelta(hours=-7))),
    ],
)
def test_writable_times(value: datetime) -> None:
    assert unwritable(value) is None
