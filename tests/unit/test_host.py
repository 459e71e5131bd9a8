"""The Host: its run state only moves forward, and one control loop ends or reloads a run."""

from __future__ import annotations

import signal
import threading
from datetime import UTC, datetime

import pytest

from kongtask.runtime.control import ControlMessage, Kill, OsSignal, Stop
from kongtask.runtime.host import Host, RunState, RunStatus
from kongtask.runtime.parts import Part
from kongtask.testing import ManualClock

DEADLINE_S = 10.0


class Recorded:
    """A service that records what the host asks of it, in one shared list."""

    def __init__(self, name: str, calls: list[str], *, drain: bool = False) -> None:
        self.name = name
        self._calls = calls
        self._drain = drain
        self.host: Host | None = None
        self.forced: bool | None = None

    def start(self, host: Host) -> None:
        self.host = host
        self._calls.append(f"{self.name}.start")

    def ready(self) -> None:
        self._calls.append(f"{self.name}.ready")

    def announce(self, cause: ControlMessage) -> None:
        self._calls.append(f"{self.name}.announce:{type(cause).__name__}")

    def shutdown(self, cause: ControlMessage) -> None:
        self._calls.append(f"{self.name}.shutdown")
        if self._drain:
            assert self.host is not None
            # Never drained by itself: only a kill or a second signal ends the wait.
            self.forced = self.host.wait_drained(lambda: False, DEADLINE_S)
            self._calls.append(f"{self.name}.state:{self.host.status.state.name}")

    def close(self) -> None:
        self._calls.append(f"{self.name}.close")

    def reload(self) -> bool:
        self._calls.append(f"{self.name}.reload")
        return True

    def parts(self) -> list[Part]:
        return []


def _host() -> Host:
    return Host(sender=object(), name="test", clock=ManualClock(datetime(2024, 1, 1, tzinfo=UTC)))


def test_the_run_state_only_moves_forward() -> None:
    status = RunStatus()
    assert status.state is RunState.RUNNING and not status.ending
    status.advance(RunState.ABORTING)
    assert status.ending and status.aborting.is_set()
    status.advance(RunState.DRAINING)  # back: ignored
    assert status.state is RunState.ABORTING
    assert not status.wait_stopped(0)
    status.advance(RunState.STOPPED)
    assert status.stopped and status.wait_stopped(0)


def test_a_stop_is_announced_in_start_order_then_shut_down_newest_first() -> None:
    calls: list[str] = []
    host = _host()
    host.start([Recorded("jobs", calls), Recorded("cron", calls)], install_signals=False)
    assert host.status.state is RunState.RUNNING
    host.send(Stop())
    assert host.status.wait_stopped(DEADLINE_S)
    assert calls == [
        "jobs.start",
        "cron.start",
        "jobs.ready",
        "cron.ready",
        "jobs.announce:Stop",
        "cron.announce:Stop",
        "cron.shutdown",
        "jobs.shutdown",
        "cron.close",
        "jobs.close",
    ]
    assert host.status.stopped


def test_sighup_reloads_every_service_and_the_run_goes_on() -> None:
    calls: list[str] = []
    host = _host()
    host.start([Recorded("jobs", calls), Recorded("cron", calls)], install_signals=False)
    try:
        host.send(OsSignal(signal.SIGHUP))
        host.send(Stop())
        assert host.status.wait_stopped(DEADLINE_S)
    finally:
        host.close()
    assert calls[4:7] == ["jobs.reload", "cron.reload", "jobs.announce:Stop"]


def test_a_kill_cuts_a_drain_short_and_the_run_aborts() -> None:
    calls: list[str] = []
    draining = Recorded("jobs", calls, drain=True)
    host = _host()
    host.start([draining], install_signals=False)
    host.send(Stop())
    host.send(Kill())
    assert host.status.wait_stopped(DEADLINE_S)
    assert draining.forced is True
    assert "jobs.state:ABORTING" in calls
    assert host.status.aborting.is_set()


def test_a_failed_start_closes_what_started_and_stops_the_run() -> None:
    calls: list[str] = []

    class Broken(Recorded):
        def start(self, host: Host) -> None:
            super().start(host)
            raise RuntimeError("no")

    host = _host()
    with pytest.raises(RuntimeError, match="no"):
        host.start([Recorded("jobs", calls), Broken("cron", calls)], install_signals=False)
    assert calls == ["jobs.start", "cron.start", "cron.close", "jobs.close"]
    assert host.status.stopped


def test_a_fatal_error_is_kept_and_ends_the_run() -> None:
    calls: list[str] = []
    host = _host()
    host.start([Recorded("jobs", calls)], install_signals=False)
    error = RuntimeError("broken")
    host.fail("claim failed: broken", error)
    host.fail("later", RuntimeError("second"))
    assert host.status.wait_stopped(DEADLINE_S)
    assert host.error is error
    assert calls[2] == "jobs.announce:Fatal"


def test_the_control_loop_runs_on_its_own_thread() -> None:
    seen: list[str] = []

    class Where(Recorded):
        def shutdown(self, cause: ControlMessage) -> None:
            seen.append(threading.current_thread().name)

    host = _host()
    host.start([Where("jobs", [])], install_signals=False)
    host.send(Stop())
    assert host.status.wait_stopped(DEADLINE_S)
    assert seen == ["kongtask-host-test"]
