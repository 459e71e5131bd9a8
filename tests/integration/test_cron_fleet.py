"""Stored cron items across nodes, and the history's job outcomes, on real PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest

import kongtask
from kongtask import ConfigurationError, CronItem, WorkerUtils
from kongtask.testing import ManualClock

from .cron_support import T0, NodeFactory, job_minutes


@pytest.fixture
def nodes(db_url: str) -> Iterator[NodeFactory]:
    factory = NodeFactory(db_url)
    yield factory
    factory.close()


def wait_until(check: Callable[[], Any], timeout_s: float = 15.0) -> Any:
    """Re-evaluate ``check`` until it is truthy; fail after the deadline."""
    deadline = time.monotonic() + timeout_s
    pause = threading.Event()
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        pause.wait(0.05)


def test_stored_items_fire_on_every_node_and_stop_after_removal(
    nodes: Any,
    db_url: str,
    db: Any,
) -> None:
    start = T0 + timedelta(seconds=30)
    first = nodes(start, crontab="# none").start()
    second = nodes(start, crontab="# none").start()
    with WorkerUtils(db_url) as utils:
        stored = utils.add_cron_item("* * * * * stored_tick ?max=2")
        assert stored.identifier == "stored_tick" and stored.item.options.max_attempts == 2
        with pytest.raises(ConfigurationError, match="exists already"):
            utils.add_cron_item(CronItem(task="stored_tick", match="@daily"))
        # NOTIFY reaches both nodes without a restart.
        first.heard.wait_for("cron:reload")
        second.heard.wait_for("cron:reload")
        for node in (first, second):
            assert [i.identifier for i in node.scheduler.get_cron_items()] == ["stored_tick"]
            assert node.scheduler.get_cron_items()[0].origin == "stored"
        first.advance(31, scheduled=1)
        second.advance(31, scheduled=1)
        assert job_minutes(db, "stored_tick") == ["00:01"]
        assert [s.identifier for s in utils.list_cron_items()] == ["stored_tick"]
        assert utils.remove_cron_item("stored_tick") is True
        assert utils.remove_cron_item("stored_tick") is False
        first.heard.wait_for("cron:reload", 2)
        second.heard.wait_for("cron:reload", 2)
    first.advance(60)
    second.advance(60)
    assert first.scheduler.get_cron_items() == []
    assert job_minutes(db, "stored_tick") == ["00:01"]


def test_a_stored_item_survives_a_restart_and_clashes_are_errors(
    nodes: Any,
    db_url: str,
    db: Any,
) -> None:
    node = nodes(T0 + timedelta(seconds=30), crontab="* * * * * tick").start()
    node.scheduler.add_cron_item("0 * * * * hourly")
    with pytest.raises(ConfigurationError, match="already used by this Scheduler's crontab"):
        node.scheduler.add_cron_item("*/5 * * * * tick")
    node.scheduler.update_cron_item("30 * * * * hourly")
    assert [s.line for s in node.scheduler.list_cron_items()] == ["30 * * * * hourly"]
    node.scheduler.stop(30)
    again = nodes(T0 + timedelta(minutes=29, seconds=30), crontab="* * * * * tick").start()
    assert sorted(i.identifier for i in again.scheduler.get_cron_items()) == ["hourly", "tick"]
    again.advance(31, scheduled=1)
    assert job_minutes(db, "hourly") == ["00:30"]


def test_history_records_the_outcomes_a_kongtask_worker_saw(db_url: str) -> None:
    def boom(payload: Any, helpers: Any) -> None:
        raise RuntimeError("report generator exploded")

    clock = ManualClock(T0 + timedelta(hours=3, minutes=59, seconds=30))
    with kongtask.run(
        tasks={"daily-report": lambda payload, helpers: None, "broken": boom},
        connection_string=db_url,
        crontab="0 4 * * * daily-report\n0 4 * * * broken ?max=1",
        clock=clock,
        install_signal_handlers=False,
    ) as runner:
        clock.wait_for_timers(1)
        clock.advance(31)
        with WorkerUtils(db_url) as utils:
            wait_until(lambda: len(utils.cron_history()) == 2)
            runner.join()

            def finished() -> dict[str, Any]:
                runs = {run.identifier: run for run in utils.cron_history()}
                done = all(run.outcome != "scheduled" for run in runs.values())
                return runs if done else {}

            runs = wait_until(finished)
    report, broken = runs["daily-report"], runs["broken"]
    assert report.outcome == "success" and report.scheduled_at == T0 + timedelta(hours=4)
    assert report.duration_s is not None and report.duration_s >= 0
    assert report.node == runner.pool_id
    assert broken.outcome == "permanent_failure"
    assert "report generator exploded" in (broken.error or "")
    assert broken.attempts == 1


def test_two_schedulers_and_a_worker_schedule_each_minute_once(
    nodes: Any, db_url: str, db: Any
) -> None:
    crontab = "* * * * * tick\n*/2 * * * * even"
    start = T0 + timedelta(seconds=30)
    first = nodes(start, crontab=crontab).start()
    second = nodes(start, crontab=crontab, backfill_on_start=False).start()
    clock = ManualClock(start)
    with kongtask.run(
        tasks={},
        connection_string=db_url,
        crontab=crontab,
        clock=clock,
        install_signal_handlers=False,
    ) as runner:
        clock.wait_for_timers(1)
        for minute in range(1, 5):
            first.advance(60 if minute > 1 else 31, scheduled=minute)
            second.advance(60 if minute > 1 else 31, scheduled=minute)
            clock.advance(60 if minute > 1 else 31)
        assert [i.identifier for i in runner.get_cron_items()] == ["tick", "even"]
    assert job_minutes(db) == ["00:01", "00:02", "00:03", "00:04"]
    assert job_minutes(db, "even") == ["00:02", "00:04"]
    nodes_seen = {run.node for run in first.scheduler.history()}
    assert nodes_seen <= {first.scheduler.node_name, second.scheduler.node_name, runner.pool_id}
