"""kongtask.Scheduler on its own (no Runner) against real PostgreSQL, on a ManualClock."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from psycopg_pool import ConnectionPool

from kongtask import CronItem, CronItemOptions, Firing, Scheduler
from kongtask.cron.types import ParsedCronItem
from kongtask.testing import ManualClock

from .cron_support import T0, Node, NodeFactory, job_minutes, remember
from .worker_support import wait_until


@pytest.fixture
def nodes(db_url: str) -> Iterator[NodeFactory]:
    factory = NodeFactory(db_url)
    yield factory
    factory.close()


def test_runs_alone_on_a_pool_the_host_owns(db_url: str, db: Any) -> None:
    clock = ManualClock(T0 + timedelta(hours=3, minutes=59, seconds=30))
    with ConnectionPool(db_url, min_size=1, max_size=2, open=True) as pool:
        scheduler = Scheduler(
            pool=pool,
            cron_items=[CronItem(task="daily-report", match="0 4 * * *", payload={"f": "pdf"})],
            clock=clock,
            install_signal_handlers=False,
        )
        node = Node(scheduler, clock)
        with scheduler:
            node.heard.wait_for("cron:started")
            assert [i.identifier for i in scheduler.get_cron_items()] == ["daily-report"]
            clock.wait_for_timers(1)
            clock.advance(31)
            event = node.heard.wait_for("cron:scheduled")
        node.heard.close()
        assert not pool.closed  # never closes what it did not open
        with pool.connection() as conn:
            assert conn.execute("select 1").fetchone() == (1,)
    assert event["scheduled_at"] == "2024-01-01T04:00:00Z"
    assert event["digest"] == "00:04:01:01:01"
    assert event["task_identifiers"] == ["daily-report"]
    assert event["firings"][0]["task_identifier"] == "daily-report"
    assert event["timestamp"] == int((T0 + timedelta(hours=4)).timestamp() * 1000)
    ((payload,),) = db.execute("select payload from graphile_worker._private_jobs").fetchall()
    assert payload == {"f": "pdf", "_cron": {"ts": "2024-01-01T04:00:00.000Z", "backfilled": False}}


def test_history_answers_when_it_last_ran(nodes: Any, db_url: str) -> None:
    node = nodes(T0 + timedelta(hours=3, minutes=59, seconds=30), crontab="0 4 * * * daily-report")
    node.start()
    node.advance(31, scheduled=1)
    (run,) = node.scheduler.history("daily-report")
    assert run.scheduled_at == T0 + timedelta(hours=4)
    assert run.outcome == "scheduled" and run.job_id is not None
    assert run.node == node.scheduler.node_name and not run.backfilled
    assert node.scheduler.history("other") == []
    assert node.scheduler.history(since=T0 + timedelta(hours=5)) == []


def test_reload_code_items_and_get(nodes: Any, db: Any) -> None:
    node = nodes(T0 + timedelta(seconds=30), cron_items=[CronItem(task="tick", match="* * * * *")])
    node.start()
    node.advance(31, scheduled=1)
    assert node.scheduler.reload_cron_items([CronItem(task="tock", match="* * * * *")]) is True
    assert [i.identifier for i in node.scheduler.get_cron_items()] == ["tock"]
    node.advance(60, scheduled=2)
    assert job_minutes(db) == ["00:01"]
    assert job_minutes(db, "tock") == ["00:02"]


def test_an_empty_file_mid_rewrite_keeps_the_live_schedule(
    nodes: Any, db: Any, tmp_path: Path
) -> None:
    crontab = tmp_path / "crontab"
    crontab.write_text("* * * * * tick\n* * * * * tock\n")
    node = nodes(T0 + timedelta(seconds=30), crontab_file=crontab)
    node.start()
    crontab.write_text("")  # caught between truncate and write
    assert node.scheduler.reload_cron_items() is False
    failed = node.heard.wait_for("cron:reloadFailed")
    assert "is empty" in str(failed["error"])
    assert len(node.scheduler.get_cron_items()) == 2
    # Rewrites in place racing reloads (what SIGHUP during `cp` did): never empty.
    done = threading.Event()

    def rewrite() -> None:
        while not done.is_set():
            with crontab.open("w") as handle:
                handle.flush()
                handle.write("* * * * * tick\n* * * * * tock\n")

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        for _ in range(5):
            node.scheduler.reload_cron_items()
            assert len(node.scheduler.get_cron_items()) == 2
    finally:
        done.set()
        writer.join()
    crontab.write_text("# nothing on purpose\n")
    assert node.scheduler.reload_cron_items() is True
    assert node.scheduler.get_cron_items() == []


def test_a_refused_item_does_not_stop_the_others(
    nodes: Any, db: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Built directly, as the parser refuses it: a NUL in the job key.
    bad = ParsedCronItem(
        identifier="bad", task="bad", minutes=tuple(range(60)), hours=tuple(range(24)),
        dates=tuple(range(1, 32)), months=tuple(range(1, 13)), dows=tuple(range(7)),
        options=CronItemOptions(job_key="a\x00b"),
    )  # fmt: skip
    caplog.set_level(logging.ERROR, logger="kongtask.cron")
    node = nodes(
        T0 + timedelta(seconds=30), cron_items=[bad, CronItem(task="tick", match="* * * * *")]
    )
    node.start()
    node.advance(31, scheduled=1)
    node.advance(60, scheduled=2)
    assert job_minutes(db) == ["00:01", "00:02"]
    failed = node.heard.of("cron:itemFailed")
    assert [(f["identifier"], f["scheduled_at"]) for f in failed] == [
        ("bad", "2024-01-01T00:01:00Z"),
        ("bad", "2024-01-01T00:02:00Z"),
    ]
    assert any("'bad' could not be scheduled" in r.getMessage() for r in caplog.records)


def test_a_node_without_backfill_leaves_the_gap_to_one_that_backfills(nodes: Any, db: Any) -> None:
    remember(db, "tick", T0 + timedelta(hours=9, minutes=59))
    line = "* * * * * tick ?fill=30m"
    plain = nodes(T0 + timedelta(hours=10, minutes=20, seconds=30), crontab=line,
                  backfill_on_start=False).start()  # fmt: skip
    plain.advance(31, scheduled=1)  # writes 10:21 first
    assert job_minutes(db) == ["10:21"]
    filler = nodes(T0 + timedelta(hours=10, minutes=21, seconds=30), crontab=line).start()
    backfilled = filler.heard.of("cron:backfill")
    assert [b["scheduled_at"][11:16] for b in backfilled][:2] == ["10:00", "10:01"]
    plain.advance(60, scheduled=2)
    filler.advance(31, scheduled=1)
    expected = [f"10:{minute:02d}" for minute in range(23)]
    assert job_minutes(db) == expected  # every minute once, nothing doubled
    rows = db.execute(
        "select count(*) filter (where backfilled) from graphile_worker._kongtask_cron_history"
    ).fetchone()
    assert rows == (21,)


def test_clock_skew_never_loses_a_minute(nodes: Any, db: Any) -> None:
    """A fast node restarting writes 18:42 before a slow node has written 18:41."""
    true_start = T0 + timedelta(hours=18, minutes=41, seconds=10)
    remember(db, "tick", T0 + timedelta(hours=18, minutes=40))
    slow = nodes(true_start - timedelta(seconds=40), crontab="* * * * * tick").start()
    fast = nodes(true_start + timedelta(seconds=40), crontab="* * * * * tick").start()
    fast.advance(11, scheduled=1)  # true 18:41:21, fast clock 18:42:01
    slow.advance(11)
    assert job_minutes(db) == ["18:42"]
    slow.advance(20, scheduled=1)  # true 18:41:40, slow clock 18:41:00
    fast.advance(20)
    assert job_minutes(db) == ["18:41", "18:42"]
    assert slow.heard.of("cron:scheduled")[0]["scheduled_identifiers"] == ["tick"]
    fast.advance(60, scheduled=2)
    slow.advance(60, scheduled=2)
    assert job_minutes(db) == ["18:41", "18:42", "18:43"]


def test_skew_against_the_database_is_reported(
    nodes: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="kongtask.cron")
    node = nodes(datetime.now(UTC) + timedelta(seconds=40), crontab="* * * * * tick")
    node.start()
    skew = node.heard.wait_for("cron:clockSkew")
    assert 35 < skew["skew_s"] < 45 and skew["tolerance_s"] == 10.0
    assert any("ahead of the database" in r.getMessage() for r in caplog.records)
    calm = nodes(datetime.now(UTC), crontab="* * * * * tick", clock_skew_tolerance_s=10.0)
    calm.start()
    assert calm.scheduler.clock_skew_s is not None and abs(calm.scheduler.clock_skew_s) < 5
    assert calm.heard.of("cron:clockSkew") == []


def test_conditional_rules_skip_and_record(nodes: Any, db: Any) -> None:
    seen: list[Firing] = []

    def odd_minutes(firing: Firing) -> bool:
        seen.append(firing)
        return firing.scheduled_at.minute % 2 == 1

    node = nodes(
        T0 + timedelta(seconds=30),
        cron_items=[CronItem(task="tick", match="* * * * *", condition=odd_minutes)],
        crontab="* * * * * holiday ?skipDates=2024-01-01\n* * * * * slow ?noOverlap=true",
    )
    node.start()
    node.advance(31, scheduled=1)
    node.advance(60, scheduled=2)
    node.advance(60, scheduled=3)
    assert job_minutes(db) == ["00:01", "00:03"]
    assert job_minutes(db, "holiday") == []
    assert job_minutes(db, "slow") == ["00:01"]  # its first job is still queued
    assert seen[0].identifier == "tick" and seen[0].scheduled_at == T0 + timedelta(minutes=1)
    skipped = {
        (s["identifier"], s["scheduled_at"][14:16], s["rule"])
        for s in node.heard.of("cron:skipped")
    }
    assert ("tick", "02", "condition") in skipped
    assert ("holiday", "01", "skipDates") in skipped
    assert ("slow", "02", "noOverlap") in skipped
    runs = node.scheduler.history("slow")
    assert [(r.outcome, r.rule) for r in runs] == [
        ("skipped", "noOverlap"), ("skipped", "noOverlap"), ("scheduled", None)
    ]  # fmt: skip
    # Once the previous job is gone (done), the next firing runs again.
    db.execute("delete from graphile_worker._private_jobs where id = %s", (runs[-1].job_id,))
    node.advance(60, scheduled=4)
    assert job_minutes(db, "slow") == ["00:04"]
    assert date(2024, 1, 1) in node.scheduler.get_cron_items()[0].options.skip_dates


def _join_condition_threads(identifier: str) -> None:
    for thread in threading.enumerate():
        if thread.name == f"kongtask-cron-condition-{identifier}":
            thread.join(10)
            assert not thread.is_alive()


def test_a_hung_condition_holds_up_nothing(nodes: Any, db: Any) -> None:
    answer = threading.Event()
    calls: list[datetime] = []

    def flag_service(firing: Firing) -> bool:
        calls.append(firing.scheduled_at)
        answer.wait(30)  # a feature-flag service that does not answer
        return True

    node = nodes(
        T0 + timedelta(seconds=30),
        cron_items=[CronItem(task="gated", match="* * * * *", condition=flag_service)],
        crontab="* * * * * tick\n* * * * * tock",
    )
    try:
        node.start()
        node.advance(31)  # 00:01 is due; the clock stands still from here
        wait_until(lambda: calls == [T0 + timedelta(minutes=1)], what="the condition call")
        wait_until(
            lambda: job_minutes(db) == ["00:01"] and job_minutes(db, "tock") == ["00:01"],
            what="the other items of 00:01, written while the condition hangs",
        )
        assert job_minutes(db, "gated") == []
        assert node.heard.of("cron:scheduled") == []  # the minute waits for its verdict
        node.advance(5)  # the condition's deadline passes
        minute = node.heard.wait_for("cron:scheduled")
        assert sorted(minute["scheduled_identifiers"]) == ["tick", "tock"]
        assert minute["skipped"] == [("gated", "condition")]
        skipped = node.heard.wait_for("cron:skipped")
        assert (skipped["identifier"], skipped["reason"]) == ("gated", "timed out after 5 s")
        (run,) = node.scheduler.history("gated")
        assert (run.outcome, run.rule, run.error) == ("skipped", "condition", "timed out after 5 s")
        # Still stuck at 00:02: skipped at once, and no second thread is started.
        node.advance(55, scheduled=2)
        assert calls == [T0 + timedelta(minutes=1)]
        assert job_minutes(db) == ["00:01", "00:02"]
        run = node.scheduler.history("gated")[0]
        assert (run.scheduled_at, run.outcome, run.error) == (
            T0 + timedelta(minutes=2),
            "skipped",
            "its condition is still running (the call for 2024-01-01T00:01:00Z has not returned)",
        )
    finally:
        answer.set()
    _join_condition_threads("gated")
    node.advance(60, scheduled=3)  # answered again: 00:03 runs
    assert calls[1:] == [T0 + timedelta(minutes=3)]
    assert job_minutes(db, "gated") == ["00:03"]


def test_a_condition_that_raises_or_has_its_own_deadline(nodes: Any, db: Any) -> None:
    answer = threading.Event()

    def down(firing: Firing) -> bool:
        raise RuntimeError("flag service down")

    def slow(firing: Firing) -> bool:
        return answer.wait(30)

    node = nodes(
        T0 + timedelta(seconds=30),
        cron_items=[
            CronItem(task="down", match="* * * * *", condition=down),
            {"task": "slow", "match": "* * * * *", "condition": slow, "condition_timeout_s": 2},
        ],
    )
    try:
        node.start()
        node.advance(31)
        wait_until(lambda: len(node.heard.of("cron:skipped")) == 1, what="down's skip")
        node.advance(2)  # slow's own deadline
        node.heard.wait_for("cron:scheduled")
    finally:
        answer.set()
    reasons = {s["identifier"]: s["reason"] for s in node.heard.of("cron:skipped")}
    assert reasons == {
        "down": "raised RuntimeError: flag service down",
        "slow": "timed out after 2 s",
    }
    assert [r.error for r in node.scheduler.history("down")] == [reasons["down"]]


def test_a_hung_condition_in_a_backfill_skips_the_rest_of_its_batch(nodes: Any, db: Any) -> None:
    answer = threading.Event()
    calls: list[datetime] = []

    def flag_service(firing: Firing) -> bool:
        calls.append(firing.scheduled_at)
        return answer.wait(30)

    remember(db, "gated", T0 + timedelta(minutes=1))
    remember(db, "tick", T0 + timedelta(minutes=1))
    node = nodes(
        T0 + timedelta(minutes=4, seconds=30),
        cron_items=[
            CronItem("gated", "* * * * *", options={"backfill_period": 600_000},
                     condition=flag_service),
        ],
        crontab="* * * * * tick ?fill=10m",
    )  # fmt: skip
    try:
        node.scheduler.start()
        wait_until(lambda: len(calls) == 1, what="the first backfilled call")
        node.clock.wait_for_timers(1)  # its deadline
        node.advance(5)
        node.heard.wait_for("cron:started")
    finally:
        answer.set()
    assert job_minutes(db) == ["00:02", "00:03", "00:04"]
    assert job_minutes(db, "gated") == []
    assert calls == [T0 + timedelta(minutes=2)]  # one call, not one thread per minute
    runs = sorted(node.scheduler.history("gated"), key=lambda r: r.scheduled_at)
    assert [(r.scheduled_at.minute, r.outcome, r.error) for r in runs] == [
        (2, "skipped", "timed out after 5 s"),
        (3, "skipped", "its condition is still running (the call for 2024-01-01T00:02:00Z"
                       " has not returned)"),
        (4, "skipped", "its condition is still running (the call for 2024-01-01T00:02:00Z"
                       " has not returned)"),
    ]  # fmt: skip
