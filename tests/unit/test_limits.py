"""The pure parts of fleet-wide limits: rate text, keys, headroom and the pick."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from kongtask.errors import ConfigurationError
from kongtask.jobs.limits import (
    Candidate,
    LimitRow,
    LimitSet,
    Rate,
    headroom,
    limit_key,
    parse_rate,
    pick,
)

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "count", "seconds"),
    [
        ("10/s", 10, 1.0),
        ("5/m", 5, 60.0),
        ("100/h", 100, 3600.0),
        (" 3 / 10s ", 3, 10.0),
        ("7/min", 7, 60.0),
        ((4, 2), 4, 2.0),
        ((1, 0.5), 1, 0.5),
    ],
)
def test_rates_parse(text: object, count: int, seconds: float) -> None:
    assert parse_rate(text) == Rate(count, seconds)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "10",
        "10/d",
        "0/s",
        "-1/s",
        "ten/s",
        "1.5/s",
        (0, 1),
        (1, 0),
        (1, -1),
        ("1", 1),
        None,
        10,
        (True, 1),
    ],
)
def test_bad_rates_name_the_value(text: object) -> None:
    with pytest.raises(ConfigurationError, match="rate") as caught:
        parse_rate(text)
    assert caught.value.name == "rate"


def test_rates_read_back_as_written() -> None:
    assert [str(parse_rate(t)) for t in ("10/s", "5/m", "100/h", "3/10s")] == [
        "10/s",
        "5/m",
        "100/h",
        "3/10s",
    ]


def test_exactly_one_key() -> None:
    assert limit_key("resize", None) == ("task", "resize")
    assert limit_key(None, "mail") == ("queue", "mail")
    assert limit_key(None, None, "tenant:7") == ("flag", "tenant:7")
    with pytest.raises(ConfigurationError, match="exactly one"):
        limit_key(None, None)
    with pytest.raises(ConfigurationError, match=r"exactly one .*\(got 2\)"):
        limit_key("resize", "mail")
    with pytest.raises(ConfigurationError, match="1 to 512 characters"):
        limit_key("", None)
    with pytest.raises(ConfigurationError, match="1 to 512 characters"):
        limit_key("x" * 513, None)


def test_a_job_falls_under_each_limited_key_it_carries() -> None:
    limits = LimitSet(frozenset({("task", "a"), ("queue", "q"), ("flag", "t1")}))
    assert limits.job_keys("a", "q", {"t1": True, "t2": True}) == [
        ("task", "a"),
        ("queue", "q"),
        ("flag", "t1"),
    ]
    assert limits.job_keys("b", None, None) == []


def test_concurrency_headroom_never_goes_below_zero() -> None:
    row = LimitRow(("task", "a"), 2, None, ())
    assert headroom(row, 0, NOW) == (2, None)
    assert headroom(row, 2, NOW) == (0, None)
    # Lowered below what runs: the running jobs finish, nothing more starts.
    assert headroom(row, 5, NOW) == (0, None)


def test_rate_headroom_counts_starts_in_the_window_and_says_when_one_more_may_start() -> None:
    starts = tuple(NOW - timedelta(seconds=s) for s in (0.2, 0.5, 0.9, 1.5))
    row = LimitRow(("task", "a"), None, Rate(3, 1.0), starts)
    room, retry = headroom(row, 0, NOW)
    assert room == 0
    # The oldest of the three starts within the last second (0.9 s ago) leaves it in 0.1 s.
    assert retry == pytest.approx(0.1)
    assert headroom(LimitRow(("task", "a"), None, Rate(5, 1.0), starts), 0, NOW) == (2, None)
    both = LimitRow(("task", "a"), 1, Rate(5, 1.0), starts)
    assert headroom(both, 0, NOW) == (1, None)


def test_the_pick_respects_every_key_and_one_job_per_queue() -> None:
    a, b, t = ("task", "a"), ("task", "b"), ("flag", "t")
    candidates = [
        Candidate(1, None, (a,)),
        Candidate(2, None, (a, t)),
        Candidate(3, None, (a,)),
        Candidate(4, "q", (b,)),
        Candidate(5, "q", (b,)),
        Candidate(6, None, (b, t)),
    ]
    room = {a: 2, b: 5, t: 1}
    taken = pick(candidates, room, want=10)
    assert [job.id for job in taken] == [1, 2, 4]
    assert room == {a: 0, b: 4, t: 0}
    assert [job.id for job in pick(candidates, {a: 5, b: 5, t: 5}, want=2)] == [1, 2]
