"""The actor base: probes answered by the base, each error policy, and retries noted by run."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import psycopg
import pykka
import pytest
from psycopg import errors

from kongtask.jobs.context import WorkerContext
from kongtask.jobs.db_actor import DbActor, Ran
from kongtask.runtime.actor import Actor, ErrorPolicy
from kongtask.runtime.probing import PROBE, probe_actors


@dataclass(frozen=True)
class Boom:
    """Raise from the handler."""


@dataclass(frozen=True)
class Echo:
    """Answer ``value``."""

    value: int


@dataclass
class Seen:
    """What the actor saw, written on its thread and read after an ``ask``."""

    handled: list[Any] = field(default_factory=list)
    fatal: list[tuple[Any, Exception]] = field(default_factory=list)
    recovered: list[tuple[Any, Exception]] = field(default_factory=list)


class Part(Actor):
    """Records what it handles; ``Boom`` raises."""

    def __init__(self, seen: Seen) -> None:
        super().__init__()
        self.seen = seen

    def handle(self, message: Boom | Echo) -> Any:
        self.seen.handled.append(message)
        match message:
            case Boom():
                raise ValueError("boom")
            case Echo(value):
                return value
        return None

    def fatal(self, message: Any, error: Exception) -> None:
        self.seen.fatal.append((message, error))

    def recover(self, message: Any, error: Exception) -> Any:
        self.seen.recovered.append((message, error))
        return "recovered"


class FatalPart(Part):
    error_policy = ErrorPolicy.FATAL


class RecoverPart(Part):
    error_policy = ErrorPolicy.RECOVER


class LoggingPart(Part):
    error_policy = ErrorPolicy.LOG_AND_CONTINUE


@pytest.fixture
def refs() -> Iterator[list[pykka.ActorRef[Any]]]:
    started: list[pykka.ActorRef[Any]] = []
    yield started
    for ref in started:
        try:
            ref.stop(timeout=5)
        except pykka.ActorDeadError:
            pass


def start(kind: type[Part], refs: list[pykka.ActorRef[Any]]) -> tuple[pykka.ActorRef[Any], Seen]:
    seen = Seen()
    ref = kind.start(seen)
    refs.append(ref)
    return ref, seen


def test_a_probe_is_answered_by_the_base_and_never_reaches_the_handler(
    refs: list[pykka.ActorRef[Any]],
) -> None:
    ref, seen = start(FatalPart, refs)
    assert ref.ask(PROBE, timeout=5) is True
    assert probe_actors({"part": ref}, 5.0) == {"part": {"ok": True}}
    assert ref.ask(Echo(1), timeout=5) == 1
    assert seen.handled == [Echo(1)]


def test_fatal_reports_the_error_and_answers_none(refs: list[pykka.ActorRef[Any]]) -> None:
    ref, seen = start(FatalPart, refs)
    assert ref.ask(Boom(), timeout=5) is None
    [(message, error)] = seen.fatal
    assert message == Boom() and isinstance(error, ValueError) and str(error) == "boom"
    assert seen.recovered == []


def test_recover_answers_in_place_of_the_handler(refs: list[pykka.ActorRef[Any]]) -> None:
    ref, seen = start(RecoverPart, refs)
    assert ref.ask(Boom(), timeout=5) == "recovered"
    assert [message for message, _ in seen.recovered] == [Boom()]
    assert seen.fatal == []
    assert ref.ask(Echo(2), timeout=5) == 2


def test_log_and_continue_keeps_a_told_failure_from_stopping_the_actor(
    refs: list[pykka.ActorRef[Any]], caplog: pytest.LogCaptureFixture
) -> None:
    ref, seen = start(LoggingPart, refs)
    caplog.set_level(logging.ERROR, logger="kongtask.runtime.actor")
    # Told, not asked: left to pykka the exception would stop the actor.
    ref.tell(Boom())
    assert ref.ask(Echo(3), timeout=5) == 3
    assert ref.is_alive()
    assert seen.fatal == [] and seen.recovered == []
    [record] = caplog.records
    assert "failed handling Boom()" in record.getMessage() and record.exc_info is not None


# --- DbActor.run_noting_retries --------------------------------------------------


class _Connection:
    closed = False
    broken = False

    def close(self) -> None:
        self.closed = True


class _Pool:
    def getconn(self, timeout: float) -> _Connection:
        return _Connection()

    def putconn(self, conn: _Connection) -> None:
        pass


class Statements(DbActor):
    """Runs the statement it is sent, with ``run_noting_retries``."""

    def handle(self, message: Any) -> Any:
        return self.run_noting_retries(message, "a test statement")


def fake_context() -> WorkerContext:
    fatal: list[BaseException] = []
    ctx = SimpleNamespace(
        pool=_Pool(),
        pool_id="pool-test",
        give_up=threading.Event(),
        fatal=lambda action, error: fatal.append(error),
    )
    return cast(WorkerContext, ctx)


def test_run_says_whether_the_statement_needed_a_retry(refs: list[pykka.ActorRef[Any]]) -> None:
    ref = Statements.start(fake_context())
    refs.append(ref)
    calls = 0

    def once_refused(conn: psycopg.Connection[Any]) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise errors.SerializationFailure("could not serialize access")
        return "done"

    assert ref.ask(lambda conn: "first try", timeout=5) == Ran("first try", False)
    assert ref.ask(once_refused, timeout=10) == Ran("done", True)
    assert calls == 2
    # The next statement starts counting afresh.
    assert ref.ask(lambda conn: "again", timeout=5) == Ran("again", False)


def test_a_closed_pool_is_not_retried(refs: list[pykka.ActorRef[Any]]) -> None:
    """A closed pool never opens again: the statement fails at once, reported as fatal,
    instead of retrying (and logging) on a thread that outlives its Runner."""
    from psycopg_pool import PoolClosed

    ctx = fake_context()
    reported: list[BaseException] = []
    ctx.fatal = lambda action, error: reported.append(error)  # type: ignore[method-assign]
    ref = Statements.start(ctx)
    refs.append(ref)
    calls = 0

    def closed(conn: psycopg.Connection[Any]) -> str:
        nonlocal calls
        calls += 1
        raise PoolClosed("the pool 'kongtask' is already closed")

    ref.ask(closed, timeout=5)
    assert calls == 1
    assert [type(error) for error in reported] == [PoolClosed]


def test_a_liveness_check_cut_short_by_a_closed_pool_logs_no_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stop that closes the pool while a liveness check waits for a connection ends the
    check quietly: no "failed (trying again next beat)" error from a pool that has gone."""
    from psycopg_pool import PoolClosed

    from kongtask.jobs.liveness import Check, Liveness

    class ClosedPool(_Pool):
        def getconn(self, timeout: float) -> _Connection:
            raise PoolClosed("the pool 'pool-test' is already closed")

    ctx = fake_context()
    ctx.pool = ClosedPool()  # type: ignore[misc]
    ctx.settings = SimpleNamespace(  # type: ignore[misc]
        pool_dead_after_s=60.0,
        crash_quarantine_after=3,
        vacuum_after_dead_rows=None,
        dead_pool_check_interval_s=60.0,
    )
    ctx.queries = SimpleNamespace(release_dead_pools="select 1")  # type: ignore[misc]
    liveness = Liveness(ctx, nudge=lambda: None, lock_conninfo=None)
    try:
        with caplog.at_level(logging.DEBUG, logger="kongtask.jobs.liveness"):
            liveness.handle(Check())
    finally:
        liveness.on_stop()
    records = [r for r in caplog.records if r.name == "kongtask.jobs.liveness"]
    assert [r.levelno for r in records] == [logging.DEBUG], [r.getMessage() for r in records]
    assert "cut short" in records[0].getMessage()
