"""Pure pieces of the operations tooling: log formats, time parsing, the chart, addresses."""

from __future__ import annotations

import io
import json
import logging
from datetime import UTC, datetime, timedelta

import pytest

from kongtask import ConfigurationError
from kongtask.ops.cli.jobs import parse_time
from kongtask.ops.dashboard.chart import render_chart, task_throughput
from kongtask.ops.dashboard.server import is_loopback
from kongtask.ops.logs import JsonFormatter, TextFormatter, configure

T0 = datetime(2026, 3, 1, 12, 0, 30, tzinfo=UTC)


def record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("kongtask.worker", logging.ERROR, __file__, 1, msg, args, None)
    rec.created = T0.timestamp()
    rec.threadName = "kongtask-worker-abc"
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_text_lines_start_with_a_utc_timestamp() -> None:
    line = TextFormatter().format(record("hello %s", "there"))
    assert line == "2026-03-01T12:00:30.000Z [kongtask.worker] ERROR: hello there"


def test_json_lines_carry_the_job_of_the_workers_lines() -> None:
    failed = record(
        "Failed task %s (%s, %.2fms, attempt %d of %d) with error '%s':\n  %s",
        42,
        "send_email",
        1.5,
        2,
        5,
        "boom",
        "Traceback...",
    )
    data = json.loads(JsonFormatter().format(failed))
    assert data["ts"] == "2026-03-01T12:00:30.000Z"
    assert (data["job_id"], data["task"], data["attempt"], data["max_attempts"]) == (
        42,
        "send_email",
        2,
        5,
    )
    assert data["message"].startswith("Failed task 42 (send_email, 1.50ms, attempt 2 of 5)")
    handler = record("[job(w: t{7})] hi", job_id=7, task_identifier="t", worker_id="worker-1")
    data = json.loads(JsonFormatter().format(handler))
    assert (data["job_id"], data["task"], data["worker_id"]) == (7, "t", "worker-1")
    pooled = record("claim failed")
    pooled.threadName = "kongtask-listen-pool-0123456789abcdef01"
    assert json.loads(JsonFormatter().format(pooled))["pool"] == "pool-0123456789abcdef01"


def test_json_keeps_a_traceback_on_one_line() -> None:
    try:
        raise ValueError("bad")
    except ValueError:
        import sys

        rec = record("oops")
        rec.exc_info = sys.exc_info()
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    assert "ValueError: bad" in json.loads(line)["exception"]


def test_configure_routes_psycopg_warnings_through_the_same_format() -> None:
    stream = io.StringIO()
    saved = {
        name: (logging.getLogger(name).handlers[:], logging.getLogger(name).propagate)
        for name in ("kongtask", "psycopg", "py.warnings")
    }
    try:
        configure("json", stream=stream)
        logging.getLogger("psycopg.pool").warning("discarding closed connection")
        logging.getLogger("psycopg.pool").info("not shown: below WARNING")
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        assert [(line["logger"], line["message"]) for line in lines] == [
            ("psycopg.pool", "discarding closed connection")
        ]
        with pytest.raises(ConfigurationError, match="--log-format must be one of text, json"):
            configure("yaml", stream=stream)
    finally:
        logging.captureWarnings(False)
        for name, (handlers, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers[:] = handlers
            logger.propagate = propagate


def test_parse_time() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_time("now", now=now) == now
    assert parse_time("+1h30m", now=now) == now + timedelta(hours=1, minutes=30)
    assert parse_time("2026-02-03T04:05:00", now=now) == datetime(2026, 2, 3, 4, 5, tzinfo=UTC)
    assert parse_time("2026-02-03T04:05:00+02:00", now=now).utcoffset() == timedelta(hours=2)
    with pytest.raises(ConfigurationError, match="--at expects") as info:
        parse_time("tomorrow", now=now)
    assert info.value.name == "--at"
    with pytest.raises(ConfigurationError, match="did not understand"):
        parse_time("+5", now=now)


def test_task_throughput_sums_pools_and_weighs_latency_by_count() -> None:
    minute = datetime(2026, 1, 1, 10, 0, tzinfo=UTC)
    rows = [
        {"minute": minute, "task": "email", "finished": 8, "failed": 1,
         "latency_mean_s": 0.5, "latency_max_s": 2.0, "latency_count": 9},
        {"minute": minute + timedelta(minutes=1), "task": "email", "finished": 1, "failed": 0,
         "latency_mean_s": 5.0, "latency_max_s": 5.0, "latency_count": 1},
        {"minute": minute, "task": "report", "finished": 30, "failed": 0,
         "latency_mean_s": None, "latency_max_s": None, "latency_count": 0},
    ]  # fmt: skip
    report, email = task_throughput(rows)
    assert (report.task, report.finished, report.latency_mean_s) == ("report", 30, None)
    assert (email.finished, email.failed, email.latency_max_s) == (9, 1, 5.0)
    assert email.latency_mean_s == pytest.approx((0.5 * 9 + 5.0) / 10)


def test_chart_draws_both_series_with_titles() -> None:
    now = datetime(2026, 1, 1, 10, 30, 15, tzinfo=UTC)
    minute = datetime(2026, 1, 1, 10, 29, tzinfo=UTC)
    svg = render_chart(now, {minute: 12}, {minute: 3, minute - timedelta(hours=3): 99})
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert "<title>10:29 UTC: 12 finished</title>" in svg
    assert "<title>10:29 UTC: 3 failed</title>" in svg
    assert "99 failed" not in svg  # outside the hour
    assert 'font-size="10">12</text>' in svg  # the scale follows the hour's peak
    assert svg.count("<rect") == 2


LOOPBACK = [("127.0.0.1", True), ("localhost", True), ("::1", True), ("127.1.2.3", True)]
NOT_LOOPBACK = [("0.0.0.0", False), ("192.168.1.5", False), ("example.com", False)]


@pytest.mark.parametrize(("host", "loopback"), [*LOOPBACK, *NOT_LOOPBACK])
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
