"""kongtask's crontab syntax superset, checked against croniter as an independent oracle."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
from croniter import croniter

from kongtask import parse_options
from kongtask.cron import digest, fire_times, parse_crontab
from kongtask.cron.types import CronItemOptions
from kongtask.errors import CrontabError

START = datetime(2024, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    "pattern",
    [
        "1-10/2 * * * *",
        "5/10 * * * *",
        "0 9-17/4 * * *",
        "0 0 1 JAN,jul *",
        "30 6 * * mon-fri",
        "0 12 * FEB-apr SAT,sun",
        "0 0 */10 * FRI",
        "15 3/6 1-20/7 * *",
        "0 8 * * FRI-SUN",
    ],
)
def test_extensions_fire_where_croniter_says(pattern: str) -> None:
    (item,) = parse_crontab(f"{pattern} task")
    ours = fire_times(item, START, START + timedelta(days=120))
    oracle = croniter(pattern.replace("FRI-SUN", "5-7"), START - timedelta(minutes=1))
    expected: list[datetime] = []
    while True:
        nxt = oracle.get_next(datetime)
        if nxt >= START + timedelta(days=120):
            break
        expected.append(nxt)
    assert ours == expected
    assert item.extensions, "a kongtask extension must be flagged"


def test_baseline_lines_carry_no_extension_note() -> None:
    (item,) = parse_crontab("*/5 1-3 * * 0 task ?fill=1h")
    assert item.extensions == ()


def test_extension_notes_name_each_part() -> None:
    (item,) = parse_crontab("1-10/2 * * JAN mon task ?tz=UTC&noOverlap=true")
    assert item.extensions == (
        "'1-10/2' in minutes",
        "'JAN' in months",
        "'mon' in days of week",
        "option 'tz'",
        "option 'noOverlap'",
    )


def test_digest_has_the_seed_form() -> None:
    assert str(digest(datetime(2024, 1, 1, 4, 0, tzinfo=UTC))) == "00:04:01:01:01"
    assert str(digest(datetime(2024, 12, 29, 23, 59, 59, tzinfo=UTC))) == "59:23:29:12:00"


def test_parse_options_reads_text_and_mappings() -> None:
    assert parse_options("?fill=1h&max=3&skipDates=2024-12-25") == CronItemOptions(
        backfill_period=timedelta(hours=1), max_attempts=3, skip_dates=(date(2024, 12, 25),)
    )
    assert parse_options({"queueName": "q", "noOverlap": True}) == CronItemOptions(
        queue_name="q", no_overlap=True
    )
    with pytest.raises(CrontabError, match="unsupported key 'colour'"):
        parse_options("colour=red")
    with pytest.raises(CrontabError, match="cannot take 'id'"):
        parse_options("id=x")
