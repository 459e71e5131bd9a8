"""The claimer's wake-ups against a real database: none is lost, none after shutdown.

The fetch policy's rules are table-tested in ``tests/unit/test_fetch_policy.py``;
these tests check the wiring around it: a ``jobs:insert`` notice that
arrives while a claim is running (after its snapshot was taken, so the claim
cannot see the new job) is acted on right after the claim answers, not at
the next poll; and once a pool is shutting down no wake-up of any kind makes
it claim again (it would take back jobs it has just failed back).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest

from kongtask import Runner, WorkerUtils
from kongtask.jobs.claimer import Claimer, HeldCount, InsertNotified, Wake
from kongtask.jobs.fetch_policy import PollDue
from kongtask.jobs.listener import Listener
from kongtask.runtime.host import RunState
from tests.integration.worker_support import actor_ref, capture_contexts

POLL_S = 60.0  # nothing here may wait for a poll


class _ToldCounter:
    """Counts the listener's messages to the claimer (each notice or reconnect)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        self._cond = threading.Condition()
        original_init = Listener.__init__
        counter = self

        def init(self: Listener, ctx: Any, nudge: Any, **kwargs: Any) -> None:
            def told() -> None:
                nudge()
                with counter._cond:
                    counter.count += 1
                    counter._cond.notify_all()

            original_init(self, ctx, told, **kwargs)

        monkeypatch.setattr(Listener, "__init__", init)

    def wait_for(self, count: int, timeout_s: float = 20.0) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.count >= count, timeout_s), self.count


def _claimer(runner: Runner) -> Any:
    return actor_ref(runner, "claimer")


def test_an_insert_notified_during_a_claim_is_claimed_right_after(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    told = _ToldCounter(monkeypatch)
    original_claim = Claimer._claim
    hold = threading.Event()
    held = threading.Event()
    release = threading.Event()

    def claim(self: Claimer, conn: psycopg.Connection[Any], want: int) -> Any:
        answer = original_claim(self, conn, want)
        if hold.is_set() and not held.is_set():
            held.set()  # the claim has answered; its snapshot predates what comes next
            assert release.wait(20), "the test never released the claim"
        return answer

    monkeypatch.setattr(Claimer, "_claim", claim)
    ran: list[str] = []
    done = threading.Event()

    def work(payload: dict[str, Any], helpers: Any) -> None:
        ran.append(payload["name"])
        if payload["name"] == "second":
            done.set()

    runner = Runner(
        tasks={"work": work},
        connection_string=db_url,
        concurrency=2,
        poll_interval_s=POLL_S,
        install_signal_handlers=False,
    )
    with runner, WorkerUtils(db_url) as utils:
        told.wait_for(1)  # the listener is connected and has said so
        _claimer(runner).ask(HeldCount(), timeout=20)  # start-up wake-ups are processed
        hold.set()
        utils.add_job("work", {"name": "first"})
        assert held.wait(20), "no claim ran after the first insert"
        utils.add_job("work", {"name": "second"})
        told.wait_for(3)  # the second notice reached the claimer's mailbox mid-claim
        release.set()
        assert done.wait(20), f"the job inserted during a claim waited for the poll: {ran}"
        runner.join(20)
    assert ran == ["first", "second"]


def test_a_stopping_pool_never_claims_again(
    db_url: str, db: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    claims_after_stop: list[int] = []
    stopping = threading.Event()
    original_claim = Claimer._claim

    def claim(self: Claimer, conn: psycopg.Connection[Any], want: int) -> Any:
        if stopping.is_set():
            claims_after_stop.append(want)
        return original_claim(self, conn, want)

    monkeypatch.setattr(Claimer, "_claim", claim)
    contexts = capture_contexts(monkeypatch)
    started = threading.Event()

    def slow(payload: dict[str, Any], helpers: Any) -> None:
        started.set()
        if helpers.abort_event.wait(20):
            raise RuntimeError("aborted")

    runner = Runner(
        tasks={"slow": slow},
        connection_string=db_url,
        concurrency=1,
        poll_interval_s=POLL_S,
        graceful_shutdown_abort_timeout_s=0.2,
        install_signal_handlers=False,
    )
    with WorkerUtils(db_url) as utils:
        utils.add_jobs([{"identifier": "slow"} for _ in range(3)])
    runner.start()
    try:
        assert started.wait(20)
        claimer = _claimer(runner)
        # The host begins draining, before its Shutdown message reaches the claimer.
        [ctx] = contexts
        ctx.run.advance(RunState.DRAINING)
        stopping.set()
        # Every kind of wake-up, as a shutdown can meet them.
        for message in (InsertNotified(), Wake(), PollDue(), InsertNotified()):
            claimer.tell(message)
        claimer.ask(HeldCount(), timeout=20)
    finally:
        assert runner.stop(30)
    assert claims_after_stop == []
    rows = db.execute(
        "select attempts, locked_by from graphile_worker._private_jobs order by id"
    ).fetchall()
    # One job failed back (attempt 1, unlocked), two returned or never claimed.
    assert sorted(rows) == [(0, None), (0, None), (1, None)]


def test_a_manual_clock_decides_readiness(db_url: str, db: psycopg.Connection[Any]) -> None:
    """``advance()`` makes a retry due, as graphile-worker's useNodeTime would."""
    from datetime import UTC, datetime

    from kongtask.testing import ManualClock

    clock = ManualClock(datetime.now(UTC))
    attempts: list[int] = []

    def flaky(payload: dict[str, Any], helpers: Any) -> None:
        attempts.append(helpers.job.attempts)
        if helpers.job.attempts == 1:
            raise RuntimeError("first try fails")

    runner = Runner(
        tasks={"flaky": flaky},
        connection_string=db_url,
        clock=clock,
        install_signal_handlers=False,
    )
    with runner, WorkerUtils(db_url) as utils:
        utils.add_job("flaky")
        runner.join(20)
        assert attempts == [1]  # the retry waits e^1 s of the clock's time
        clock.advance(3600)
        runner.join(20)
        assert attempts == [1, 2]
    assert db.execute("select count(*) from graphile_worker._private_jobs").fetchone() == (0,)


def test_a_stop_under_a_backlog_ends_claiming(
    db_url: str, db: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Executors that drain faster than claims must not keep the claimer claiming after stop."""
    claims_while_stopping: list[int] = []
    original_claim = Claimer._claim

    def claim(self: Claimer, conn: psycopg.Connection[Any], want: int) -> Any:
        if self.ctx.stopping:
            claims_while_stopping.append(want)
        return original_claim(self, conn, want)

    monkeypatch.setattr(Claimer, "_claim", claim)
    total = 20000
    with WorkerUtils(db_url) as utils:
        utils.add_jobs([{"identifier": "noop"} for _ in range(total)])
    ran = [0]
    some_ran = threading.Event()

    pause = threading.Event()

    def noop(payload: Any, helpers: Any) -> None:
        pause.wait(0.001)  # a 1 ms job, as in the sustained benchmark
        ran[0] += 1
        if ran[0] >= 200:
            some_ran.set()

    runner = Runner(
        tasks={"noop": noop},
        connection_string=db_url,
        concurrency=8,
        local_queue_size=64,
        poll_interval_s=POLL_S,
        install_signal_handlers=False,
    )
    runner.start()
    assert some_ran.wait(30)
    assert runner.stop(30)
    left = db.execute("select count(*) from graphile_worker._private_jobs").fetchone()
    assert left is not None
    # At most the claim already running when the stop began.
    assert len(claims_while_stopping) <= 1, claims_while_stopping
    assert left[0] > 0, "the whole backlog ran after the stop"
    locked = db.execute(
        "select count(*) from graphile_worker._private_jobs where locked_at is not null"
    ).fetchone()
    assert locked == (0,)


def test_a_slow_claim_refreshes_the_jobs_statistics(
    db_url: str, db: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backlog on a table analyzed while empty makes the claimer analyze it itself."""
    import kongtask.jobs.claimer as claimer_module

    db.execute("analyze graphile_worker._private_jobs")  # statistics of an empty table
    with WorkerUtils(db_url) as utils:
        utils.add_jobs([{"identifier": "noop"} for _ in range(2000)])
    # Every claim counts as slow here; the real threshold (0.1 s) is what a claim
    # sorting a backlog of 100,000 jobs takes.
    monkeypatch.setattr(claimer_module, "SLOW_STATEMENT_S", 0.0)

    def counts() -> tuple[int, float]:
        row = db.execute(
            "select s.analyze_count, c.reltuples from pg_stat_user_tables s "
            "join pg_class c on c.oid = s.relid "
            "where s.schemaname = 'graphile_worker' and s.relname = '_private_jobs'"
        ).fetchone()
        assert row is not None
        return int(row[0]), float(row[1])

    before, _ = counts()
    runner = Runner(
        tasks={"noop": lambda payload, helpers: None},
        connection_string=db_url,
        concurrency=2,
        poll_interval_s=POLL_S,
        install_signal_handlers=False,
    )
    with runner:
        runner.join(30)
    after, reltuples = counts()
    assert after == before + 1  # once: the next claims are within the minute
    assert reltuples > 1000  # analyzed with the backlog in the table


def test_claims_go_on_while_the_jobs_table_is_analyzed(
    db_url: str, db: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The analyze after a slow claim runs beside the claims: a backlog drains while it runs.

    The analyze is made to take 20 s (``pg_sleep``); every job must be done while it
    still runs, which a claimer that waited for it could not do.
    """
    from psycopg import sql

    import kongtask.jobs.claimer as claimer_module
    from kongtask.db.statements import Queries, templates

    templates()  # read the SQL files first: they refuse a name Queries has itself
    monkeypatch.setattr(claimer_module, "SLOW_STATEMENT_S", 0.0)  # every claim is slow
    monkeypatch.setattr(
        Queries, "analyze_jobs", sql.SQL("select pg_sleep(20) /* slow analyze */"), raising=False
    )
    with WorkerUtils(db_url) as utils:
        utils.add_jobs([{"identifier": "noop"} for _ in range(300)])
    runner = Runner(
        tasks={"noop": lambda payload, helpers: None},
        connection_string=db_url,
        concurrency=2,
        local_queue_size=20,  # many claims, not one
        poll_interval_s=POLL_S,
        install_signal_handlers=False,
    )
    sleeping = (
        "select count(*) from pg_stat_activity "
        "where query like '%%slow analyze%%' and state = 'active' and pid <> pg_backend_pid()"
    )
    pause = threading.Event()
    with runner:
        deadline = time.monotonic() + 15
        while db.execute("select count(*) from graphile_worker._private_jobs").fetchone() != (0,):
            assert time.monotonic() < deadline, "the backlog did not drain while the analyze ran"
            pause.wait(0.05)
        assert db.execute(sleeping).fetchone() == (1,)  # the analyze still runs
        runner.kill()
