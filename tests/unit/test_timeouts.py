"""Timeout settings, which task gets which timeout, and the watchdog's decision."""

from __future__ import annotations

import threading
from typing import Any

import pytest

import kongtask
from kongtask import ConfigurationError, Runner, WorkerSettings
from kongtask.jobs.supervisor import task_timeouts
from kongtask.jobs.watchdog import TimedRun, Watchdog
from kongtask.ops.cli.main import _worker_parser


def _noop(payload: Any, helpers: Any) -> None:
    return None


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), "5", True])
def test_a_bad_worker_timeout_is_a_configuration_error_naming_it(value: Any) -> None:
    with pytest.raises(ConfigurationError, match="timeout_s") as raised:
        Runner(tasks={"t": _noop}, timeout_s=value)
    assert raised.value.name == "timeout_s"


def test_the_worker_timeout_is_an_option_and_a_setting() -> None:
    assert Runner(tasks={"t": _noop}, timeout_s=5).settings.timeout_s == 5
    assert WorkerSettings().timeout_s is None


def test_a_declared_timeout_wins_over_the_worker_default() -> None:
    declared = kongtask.task(timeout_s=2.5)(_noop)
    untimed = kongtask.task(name="untimed")(_noop)
    tasks = {"declared": declared, "untimed": untimed, "plain": _noop}
    assert task_timeouts(tasks, None) == {"declared": 2.5}
    assert task_timeouts(tasks, 9) == {"declared": 2.5, "untimed": 9.0, "plain": 9.0}


def test_the_timeout_flag() -> None:
    assert _worker_parser().parse_args(["--timeout", "1.5"]).timeout == 1.5
    assert _worker_parser().parse_args([]).timeout is None
    with pytest.raises(SystemExit):
        _worker_parser().parse_args(["--timeout", "0"])


def test_the_watchdog_expires_a_late_run_once_and_the_executor_loses_the_race() -> None:
    expired: list[TimedRun] = []
    done = threading.Event()

    def expire(run: TimedRun) -> None:
        expired.append(run)
        run.abort()

    watchdog = Watchdog(0.05, expire, name="test-watchdog")
    watchdog.start()
    try:
        late = TimedRun(0, 0.05, done.set)
        quick = TimedRun(1, 0.05, lambda: None)
        watchdog.watch(late)
        watchdog.watch(quick)
        assert watchdog.finish(quick) is True  # in time: the executor records it
        assert done.wait(5), "the late run was never aborted"
        assert watchdog.finish(late) is False  # expired: its result is ignored
        assert expired == [late]
    finally:
        watchdog.stop()
