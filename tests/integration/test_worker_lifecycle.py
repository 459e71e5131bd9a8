"""Starting, stopping and supervising a worker: events, shutdowns, sweeps, embedding."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest
from psycopg import sql

from kongtask.db.migrate import migrate
from kongtask.errors import ConfigurationError
from kongtask.runner import Runner
from kongtask.testing import ManualClock

from .worker_support import add_jobs_sql, jobs, locked_queues, recording


def _runner(db_url: str, tasks: dict[str, Any], **options: Any) -> Runner:
    options.setdefault("install_signal_handlers", False)
    return Runner(tasks=tasks, connection_string=db_url, **options)


def test_event_sequence_of_a_run(db_url: str) -> None:
    runner = _runner(db_url, {"t": lambda payload, helpers: None}, concurrency=3)
    with recording(runner) as log:
        runner.start()
        started = log.names()
        assert started[:2] == ["pool:create", "pool:listen:connecting"]
        assert started.count("worker:create") == 3
        runner.add_job("t", {"a": 1})
        runner.join(10)
        assert runner.stop(30)
        names = log.names()
    life = [n for n in names if n in ("job:start", "job:success", "job:complete")]
    assert life == ["job:start", "job:success", "job:complete"]
    tail = [n for n in names if n in ("stop", "worker:release", "worker:stop", "pool:release")]
    assert tail == ["stop"] + ["worker:release"] * 3 + ["worker:stop"] * 3 + ["pool:release"]
    assert names[-1] == "pool:release"
    worker_ids = {p["worker_id"] for p in log.payloads("worker:create")}
    assert worker_ids == set(runner.worker_ids)
    assert all(w.startswith("worker-") and len(w) == len("worker-") + 18 for w in worker_ids)


def test_a_raising_receiver_does_not_break_the_worker_or_other_receivers(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    from kongtask import events

    runner = _runner(db_url, {"t": lambda payload, helpers: None})
    got: list[int] = []

    def bad(sender: Any, **payload: Any) -> None:
        raise RuntimeError("receiver bug")

    def good(sender: Any, **payload: Any) -> None:
        got.append(payload["job"].id)

    events.job_success.connect(bad, sender=runner)
    events.job_success.connect(good, sender=runner)
    try:
        with runner:
            job = runner.add_job("t", {})
            runner.join(10)
            assert runner.events is events
        assert got == [job.id]
        assert jobs(db) == []
    finally:
        events.job_success.disconnect(bad)
        events.job_success.disconnect(good)


def test_graceful_shutdown_lets_running_jobs_finish(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    started = threading.Event()
    release = threading.Event()

    def slow(payload: Any, helpers: Any) -> None:
        started.set()
        assert release.wait(10)

    runner = _runner(db_url, {"slow": slow}, graceful_shutdown_abort_timeout_s=30)
    with recording(runner) as log:
        runner.start()
        runner.add_job("slow", {}, queue_name="serial")
        assert started.wait(10)
        stopper = threading.Thread(target=runner.stop)
        stopper.start()
        log.wait_for("worker:release")
        assert not runner.wait(0.05)  # still draining: the job is running
        release.set()
        stopper.join(30)
        assert runner.wait(1)
    assert "job:success" in log.names()
    assert jobs(db) == []
    assert locked_queues(db) == 0


def test_abort_timeout_sets_abort_event_and_fails_the_job_back(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    started = threading.Event()
    aborted = threading.Event()
    finished = threading.Event()

    def stubborn(payload: Any, helpers: Any) -> None:
        started.set()
        if helpers.abort_event.wait(10):
            aborted.set()
        finished.wait(10)  # keeps running after the abort, as a badly behaved task would

    runner = _runner(
        db_url,
        {"stubborn": stubborn, "other": lambda payload, helpers: None},
        graceful_shutdown_abort_timeout_s=0.2,
        concurrency=1,
        local_queue_size=10,
    )
    add_jobs_sql(db, [{"identifier": "stubborn", "payload": {}, "queue_name": "q"}])
    add_jobs_sql(db, [{"identifier": "other", "payload": {"n": n}} for n in range(3)])
    runner.start()
    assert started.wait(10)
    assert runner.stop(30)
    assert aborted.is_set()
    finished.set()
    rows = jobs(db)
    stubborn_row = next(row for row in rows if row["task_identifier"] == "stubborn")
    assert stubborn_row["attempts"] == 1
    assert stubborn_row["last_error"] == "Worker pool is shutting down gracefully"
    assert stubborn_row["locked_by"] is None
    # The buffered jobs that never started were given back with their attempt refunded.
    others = [row for row in rows if row["task_identifier"] == "other"]
    assert len(others) == 3
    assert all(row["attempts"] == 0 and row["locked_by"] is None for row in others)
    assert locked_queues(db) == 0


def test_kill_fails_running_jobs_at_once(db_url: str, db: psycopg.Connection[Any]) -> None:
    started = threading.Event()
    finished = threading.Event()

    def hang(payload: Any, helpers: Any) -> None:
        started.set()
        finished.wait(10)

    runner = _runner(db_url, {"hang": hang}, graceful_shutdown_abort_timeout_s=60)
    with recording(runner) as log:
        runner.start()
        runner.add_job("hang", {}, queue_name="q")
        assert started.wait(10)
        assert runner.kill(30)
        finished.set()
    [row] = jobs(db)
    assert row["attempts"] == 1
    assert row["last_error"] == "Forced worker shutdown"
    assert row["locked_at"] is None and row["locked_by"] is None
    assert locked_queues(db) == 0
    [complete] = log.payloads("pool:forcefulShutdown:complete")
    assert [job.id for job in complete["force_failed_jobs"]] == [row["id"]]


def test_stop_escalates_when_killed_during_the_drain(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    started = threading.Event()
    finished = threading.Event()

    def hang(payload: Any, helpers: Any) -> None:
        started.set()
        finished.wait(10)

    runner = _runner(db_url, {"hang": hang}, graceful_shutdown_abort_timeout_s=60)
    with recording(runner) as log:
        runner.start()
        runner.add_job("hang", {})
        assert started.wait(10)
        assert not runner.stop(timeout=0)  # the drain begins; the handler keeps it going
        log.wait_for("worker:release")
        assert runner.kill(30)
        finished.set()
    [row] = jobs(db)
    assert row["last_error"] == "Forced worker shutdown" and row["locked_by"] is None


def test_stale_lock_sweep_driven_by_a_manual_clock(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    add_jobs_sql(
        db, [{"identifier": "t", "payload": {"n": 1}}, {"identifier": "t", "payload": {"n": 2}}]
    )
    # One job locked an hour ago by a worker that died, one locked just now by a live one.
    db.execute(
        "update graphile_worker._private_jobs set locked_by = 'pool-dead', attempts = 1, "
        "locked_at = now() - interval '1 hour' where payload->>'n' = '1'"
    )
    db.execute(
        "update graphile_worker._private_jobs set locked_by = 'pool-alive', locked_at = now() "
        "where payload->>'n' = '2'"
    )
    ran: list[int] = []
    clock = ManualClock()
    runner = _runner(
        db_url,
        {"t": lambda payload, helpers: ran.append(payload["n"])},
        clock=clock,
        lock_expiry="30 minutes",
    )
    with runner, recording(runner) as log:
        runner.join(10)
        assert ran == []
        clock.advance(60)  # the first sweep runs within a minute of starting
        log.wait_for("resetLocked:success")
        runner.join(10)
        assert ran == [1]
        [success] = log.payloads("resetLocked:success")
        assert 480 <= success["delay_s"] <= 600
    rows = jobs(db)
    assert [row["locked_by"] for row in rows] == ["pool-alive"]


def test_two_runners_on_different_schemas_do_not_interfere(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    migrate(db, "other_schema")
    ran_a: list[Any] = []
    ran_b: list[Any] = []
    a = _runner(db_url, {"t": lambda payload, helpers: ran_a.append(payload)}, concurrency=2)
    b = _runner(
        db_url, {"t": lambda payload, helpers: ran_b.append(payload)}, schema="other_schema"
    )
    with recording(a) as log_a, recording(b) as log_b, a, b:
        a.add_job("t", {"to": "a"})
        b.add_job("t", {"to": "b"})
        a.join(10)
        b.join(10)
        b.stop(30)
        a.add_job("t", {"to": "a", "again": True})
        a.join(10)
    assert ran_a == [{"to": "a"}, {"to": "a", "again": True}]
    assert ran_b == [{"to": "b"}]
    assert log_a.count("job:success") == 2 and log_b.count("job:success") == 1
    assert log_a.count("worker:create") == 2 and log_b.count("worker:create") == 1
    for schema in ("graphile_worker", "other_schema"):
        count = db.execute(
            sql.SQL("select count(*) from {}._private_jobs").format(sql.Identifier(schema))
        ).fetchone()
        assert count == (0,)


def test_bad_options_are_rejected_before_anything_starts(db_url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Runner(tasks={"t": print}, connection_string=db_url, concurrency=0)
    assert info.value.name == "concurrency"
    with pytest.raises(ConfigurationError) as info:
        Runner(tasks={"t": "not callable"}, connection_string=db_url)  # type: ignore[dict-item]
    assert info.value.name == "tasks"


def test_sigterm_drains_chains_the_previous_handler_and_is_removed_on_stop(
    db_url: str, tmp_path: Any
) -> None:
    import os
    import signal

    previous_calls: list[int] = []

    def previous(signum: int, frame: Any) -> None:
        previous_calls.append(signum)

    original = signal.signal(signal.SIGTERM, previous)
    try:
        crontab = tmp_path / "crontab"
        crontab.write_text("0 4 * * * t\n")
        runner = Runner(
            tasks={"t": lambda payload, helpers: None},
            connection_string=db_url,
            install_signal_handlers=True,
            crontab_file=crontab,
        )
        with recording(runner) as log:
            runner.start()
            assert signal.getsignal(signal.SIGTERM) is not previous
            crontab.write_text("0 4 * * * t\n0 5 * * * t ?id=later\n")
            os.kill(os.getpid(), signal.SIGHUP)
            log.wait_for("cron:reload")
            os.kill(os.getpid(), signal.SIGTERM)
            assert runner.wait(30)
        assert previous_calls == [signal.SIGTERM]
        assert log.payloads("cron:reload") == [{"items": 2, "added": ["later"], "removed": []}]
        assert log.payloads("gracefulShutdown") == [{"signal": "SIGTERM"}]
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, original)


def test_no_signal_handlers_when_disabled(db_url: str) -> None:
    import signal

    before = signal.getsignal(signal.SIGTERM)
    runner = _runner(db_url, {"t": lambda payload, helpers: None})
    with runner:
        assert signal.getsignal(signal.SIGTERM) is before
