"""The pure parts of cron scheduling: job specs, timestamps, the backfill plan."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from kongtask.cron import parse_crontab
from kongtask.cron.schedule import (
    KnownCrontab,
    backfill_plan,
    ceil_minute,
    cron_timestamp,
    floor_minute,
    job_spec,
)

T0 = datetime(2021, 1, 1, tzinfo=UTC)


def test_cron_timestamp_is_javascript_iso() -> None:
    assert cron_timestamp(T0) == "2021-01-01T00:00:00.000Z"
    assert cron_timestamp(T0 + timedelta(milliseconds=1234)) == "2021-01-01T00:00:01.234Z"


def test_minute_rounding() -> None:
    when = T0 + timedelta(seconds=30)
    assert floor_minute(when) == T0
    assert ceil_minute(when) == T0 + timedelta(minutes=1)
    assert ceil_minute(T0) == T0


def test_job_spec_carries_options_and_cron_marker() -> None:
    (item,) = parse_crontab(
        "0 4 * * * send ?id=nightly&queue=mail&max=3&priority=-2&jobKey=k {to: 'x', _cron: 1}"
    )
    spec = job_spec(item, T0 + timedelta(hours=4), backfilled=True)
    assert spec == {
        "identifier": "nightly",
        "task": "send",
        "payload": {"to": "x", "_cron": {"ts": "2021-01-01T04:00:00.000Z", "backfilled": True}},
        "queue_name": "mail",
        "max_attempts": 3,
        "job_key": "k",
        "priority": -2,
        "job_key_mode": "replace",
    }


def test_backfill_plan_respects_fill_known_and_last_execution() -> None:
    items = parse_crontab(
        "0 * * * * hourly ?fill=3h\n"
        "30 * * * * halfpast ?fill=1h\n"
        "0 * * * * unknown ?fill=5h\n"
        "0 * * * * nofill\n"
    )
    start = T0 + timedelta(hours=10, minutes=5)
    known = {
        "hourly": KnownCrontab("hourly", T0, T0 + timedelta(hours=8)),
        "halfpast": KnownCrontab("halfpast", T0 + timedelta(hours=9, minutes=40), None),
        "nofill": KnownCrontab("nofill", T0, None),
    }
    plan = [
        (ts - T0, [item.identifier for item in due])
        for ts, due in backfill_plan(items, known, start)
    ]
    assert plan == [
        (timedelta(hours=9), ["hourly"]),
        (timedelta(hours=10), ["hourly"]),
    ]


def test_backfill_plan_includes_minute_at_known_since_when_never_run() -> None:
    (item,) = parse_crontab("* * * * * t ?fill=10m")
    start = T0 + timedelta(minutes=3, seconds=1)
    known = {"t": KnownCrontab("t", T0 + timedelta(minutes=1), None)}
    minutes = [ts.minute for ts, _ in backfill_plan([item], known, start)]
    assert minutes == [1, 2, 3]
