"""Timeouts that free the executor slot, and cancelling waiting and running jobs."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from typing import Any

import psycopg
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from psycopg.rows import dict_row

import kongtask
import kongtask.ops.metrics
from kongtask import ConfigurationError, InvalidJobError, Runner, WorkerUtils
from kongtask.ops.cli.jobs import jobs_main, render_status

from .worker_support import DEADLINE_S, Abortable, jobs, recording, wait_until


def _runner(db_url: str, tasks: dict[str, Any], **options: Any) -> Runner:
    options.setdefault("install_signal_handlers", False)
    return Runner(tasks=tasks, connection_string=db_url, **options)


def _row(db: psycopg.Connection[Any], job_id: int) -> dict[str, Any] | None:
    rows = [row for row in jobs(db) if row["id"] == job_id]
    return rows[0] if rows else None


def test_a_timeout_aborts_fails_the_attempt_and_it_retries(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    aborted = threading.Event()

    def polite(payload: Any, helpers: Any) -> None:
        # Honours the abort signal: returns as soon as the timeout sets it.
        if helpers.abort_event.wait(DEADLINE_S):
            aborted.set()

    runner = _runner(db_url, {"polite": polite}, timeout_s=0.5)
    assert runner.settings.timeout_s == 0.5
    with recording(runner) as log, runner:
        job = runner.add_job("polite", {})
        log.wait_for("job:error")
        assert aborted.wait(DEADLINE_S), "the handler's abort event was never set"
        runner.join(DEADLINE_S)
        [error] = log.payloads("job:error")
        assert isinstance(error["error"], kongtask.JobTimeoutError)
        assert log.count("job:success") == 0 and log.count("job:failed") == 0
    row = _row(db, job.id)
    assert row is not None
    assert row["last_error"] == "timed out after 0.5 s"
    assert row["attempts"] == 1 and row["is_available"] is True  # retried as usual
    assert row["locked_by"] is None
    assert row["delay_s"] == pytest.approx(math.exp(1), abs=0.05)


def test_a_stubborn_handler_frees_its_slot_and_its_late_result_is_ignored(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    release = threading.Event()
    quick_started = threading.Event()
    times: dict[str, float] = {}

    @kongtask.task(timeout_s=0.5)
    def stubborn(payload: Any, helpers: Any) -> str:
        # Ignores its abort event: only the test lets it return.
        release.wait(DEADLINE_S)
        return "late"

    def quick(payload: Any, helpers: Any) -> None:
        times["quick"] = time.monotonic()
        quick_started.set()

    runner = _runner(
        db_url,
        {"stubborn": stubborn, "quick": quick},
        concurrency=1,
        heartbeat_interval_s=0.2,
    )
    with recording(runner) as log, runner:

        def on_error(sender: Any, **payload: Any) -> None:
            times.setdefault("timeout", time.monotonic())

        kongtask.events.job_error.connect(on_error, sender=runner, weak=False)
        try:
            stuck = runner.add_job("stubborn", {}, max_attempts=1, priority=-1)
            log.wait_for("job:start")
            runner.add_job("quick", {})
            # -j 1: the next job starts although the stubborn handler still runs.
            assert quick_started.wait(DEADLINE_S), "the slot was not freed"
            assert times["quick"] - times["timeout"] < 2.0
            load = runner.load()
            assert load is not None and load.stuck_threads == 1
            registry = CollectorRegistry()
            metrics = kongtask.ops.metrics.register(registry, runner=runner)
            try:
                gauge = f'kongtask_stuck_threads{{pool="{runner.pool_id}"}} 1.0'.encode()
                assert gauge in generate_latest(registry)
            finally:
                metrics.detach()
            with WorkerUtils(db_url) as utils:
                wait_until(
                    lambda: [p.stuck_threads for p in utils.list_pools()] == [1],
                    what="the stuck thread in the pool's heartbeat row",
                )
                assert "STUCK" in render_status(utils.status())
            row = _row(db, stuck.id)
            assert row is not None and row["last_error"] == "timed out after 0.5 s"
            assert row["attempts"] == 1 and row["is_available"] is False
            assert log.count("job:failed") == 1

            release.set()  # the late "success" must not be recorded
            wait_until(lambda: runner.load().stuck_threads == 0, what="the stuck thread to end")  # type: ignore[union-attr]
            runner.join(DEADLINE_S)
        finally:
            kongtask.events.job_error.disconnect(on_error)
        completes = [p for p in log.payloads("job:complete") if p["job"].id == stuck.id]
        assert len(completes) == 1
        assert [p["job"].task_identifier for p in log.payloads("job:success")] == ["quick"]
    row = _row(db, stuck.id)
    assert row is not None, "the late result completed (deleted) a failed job"
    assert row["last_error"] == "timed out after 0.5 s" and row["locked_by"] is None


def test_cancel_a_waiting_job(db_url: str, db: psycopg.Connection[Any]) -> None:
    with WorkerUtils(db_url) as utils:
        job = utils.add_job("later", {}, max_attempts=7)
        result = utils.cancel_job(job.id, "no longer needed")
        assert result == kongtask.CancelResult(job.id, "cancelled")
        row = _row(db, job.id)
        assert row is not None
        assert row["last_error"] == "cancelled: no longer needed"
        assert row["attempts"] == 7 and row["max_attempts"] == 7
        assert row["is_available"] is False and row["locked_by"] is None
        assert utils.cancel_job(job.id).outcome == "finished"
        assert _row(db, job.id)["last_error"] == "cancelled: no longer needed"  # type: ignore[index]
        assert utils.cancel_job(job.id + 1000).outcome == "missing"

        plain = utils.add_job("later", {})
        assert utils.cancel_job(plain.id).outcome == "cancelled"
        assert _row(db, plain.id)["last_error"] == "cancelled"  # type: ignore[index]


class _Rollback(Exception):
    pass


def test_cancel_job_on_a_connection_takes_effect_when_it_commits(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    with WorkerUtils(db_url) as utils:
        job = utils.add_job("later", {})
    # A caller's row factory is the caller's: the result reads the same.
    with psycopg.connect(db_url, row_factory=dict_row) as conn:
        with conn.transaction(force_rollback=True):
            result = kongtask.cancel_job(job.id, "changed my mind", connection=conn)
            assert result == kongtask.CancelResult(job.id, "cancelled")
        assert _row(db, job.id)["last_error"] is None  # type: ignore[index]
        with conn.transaction():
            kongtask.cancel_job(job.id, "for real", connection=conn)
            assert _row(db, job.id)["last_error"] is None  # type: ignore[index]
    assert _row(db, job.id)["last_error"] == "cancelled: for real"  # type: ignore[index]
    assert kongtask.cancel_job(job.id, connection_string=db_url).outcome == "finished"


def test_cancel_job_async_cancels_at_commit_and_signals_a_running_job(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    waits = Abortable()

    async def scenario(waiting_id: int, running_id: int) -> list[kongtask.CancelResult]:
        async with await psycopg.AsyncConnection.connect(db_url, row_factory=dict_row) as conn:
            try:
                async with conn.transaction():
                    await kongtask.cancel_job_async(waiting_id, connection=conn)
                    raise _Rollback
            except _Rollback:
                pass
            assert _row(db, waiting_id)["last_error"] is None  # type: ignore[index]
            async with conn.transaction():
                results = [
                    await kongtask.cancel_job_async(waiting_id, "gone", connection=conn),
                    await kongtask.cancel_job_async(running_id, connection=conn),
                ]
                # Nothing is signalled before the commit.
                assert not waits.aborted.is_set()
            return results

    runner = _runner(db_url, {"waits": waits})
    with recording(runner) as log, runner:
        with WorkerUtils(db_url) as utils:
            waiting = utils.add_job("later", {})
            running = utils.add_job("waits", {})
        assert waits.started.wait(DEADLINE_S)
        waiting_result, running_result = asyncio.run(scenario(waiting.id, running.id))
        assert waiting_result == kongtask.CancelResult(waiting.id, "cancelled")
        assert running_result == kongtask.CancelResult(running.id, "signalled", runner.pool_id)
        assert waits.aborted.wait(DEADLINE_S), "the pool never set the abort event"
        log.wait_for("job:failed")
    assert _row(db, waiting.id)["last_error"] == "cancelled: gone"  # type: ignore[index]
    assert _row(db, running.id)["last_error"] == "cancelled"  # type: ignore[index]


def test_cancel_job_async_refuses_bad_input_and_changes_nothing(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    with WorkerUtils(db_url) as utils:
        job = utils.add_job("later", {})
    before = jobs(db)

    async def scenario() -> None:
        async with await psycopg.AsyncConnection.connect(db_url) as conn:
            with pytest.raises(InvalidJobError, match="cancel_job: the job id"):
                await kongtask.cancel_job_async(0, connection=conn)
            with pytest.raises(InvalidJobError, match="cancel_job: reason"):
                await kongtask.cancel_job_async(job.id, 42, connection=conn)  # type: ignore[arg-type]
        with (
            psycopg.connect(db_url) as sync_conn,
            pytest.raises(ConfigurationError, match=r"psycopg\.AsyncConnection"),
        ):
            await kongtask.cancel_job_async(job.id, connection=sync_conn)  # type: ignore[arg-type]

    asyncio.run(scenario())

    async def sync_on_async() -> None:
        async with await psycopg.AsyncConnection.connect(db_url) as conn:
            kongtask.cancel_job(job.id, connection=conn)  # type: ignore[arg-type]

    with pytest.raises(ConfigurationError, match="cancel_job_async"):
        asyncio.run(sync_on_async())
    assert jobs(db) == before


@pytest.mark.parametrize(
    ("job_id", "reason", "field"),
    [
        (0, None, "job_id"),
        (-3, None, "job_id"),
        ("1", None, "job_id"),
        (True, None, "job_id"),
        (2**63, None, "job_id"),
        (1, 42, "reason"),
        (1, "x" * 1001, "reason"),
        (1, "a\x00b", "reason"),
    ],
)
def test_cancel_refuses_bad_input_and_changes_nothing(
    db_url: str, db: psycopg.Connection[Any], job_id: Any, reason: Any, field: str
) -> None:
    with WorkerUtils(db_url) as utils:
        utils.add_job("later", {})
        before = jobs(db)
        with pytest.raises(InvalidJobError) as raised:
            utils.cancel_job(job_id, reason)
        assert raised.value.field == field
        assert "cancel_job" in str(raised.value)
    assert jobs(db) == before


def test_cancel_a_running_job_held_by_either_of_two_runners(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    started = threading.Event()
    aborted = threading.Event()
    ran_in: list[str] = []

    def waits(payload: Any, helpers: Any) -> None:
        ran_in.append(helpers.job.locked_by)
        started.set()
        if helpers.abort_event.wait(DEADLINE_S):
            aborted.set()

    first = _runner(db_url, {"waits": waits})
    second = _runner(db_url, {"waits": waits})
    with recording(first) as log_first, recording(second) as log_second, first, second:
        with WorkerUtils(db_url) as utils:
            job = utils.add_job("waits", {})
            assert started.wait(DEADLINE_S)
            result = utils.cancel_job(job.id, "stop it")
        assert result.outcome == "signalled"
        assert result.pool_id == ran_in[0] in (first.pool_id, second.pool_id)
        assert aborted.wait(DEADLINE_S), "the holding pool never set the abort event"
        holder = log_first if first.pool_id == result.pool_id else log_second
        holder.wait_for("job:failed")
        [failed] = holder.payloads("job:failed")
        assert isinstance(failed["error"], kongtask.JobCancelledError)
        first.join(DEADLINE_S)
        second.join(DEADLINE_S)
    assert len(ran_in) == 1
    row = _row(db, job.id)
    assert row is not None
    assert row["last_error"] == "cancelled: stop it"
    assert row["attempts"] == row["max_attempts"] == 25
    assert row["locked_by"] is None and row["is_available"] is False


def test_a_cancelled_job_that_ignores_its_abort_fails_for_good_at_its_timeout(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    started = threading.Event()
    release = threading.Event()
    stuck: list[threading.Thread] = []

    def stubborn(payload: Any, helpers: Any) -> None:
        stuck.append(threading.current_thread())
        started.set()
        release.wait(DEADLINE_S)

    runner = _runner(db_url, {"stubborn": stubborn}, timeout_s=1.0)
    try:
        with recording(runner) as log, runner:
            job = runner.add_job("stubborn", {})
            assert started.wait(DEADLINE_S)
            with WorkerUtils(db_url) as utils:
                assert utils.cancel_job(job.id).outcome == "signalled"
            log.wait_for("job:failed")
            runner.join(DEADLINE_S)
            row = _row(db, job.id)
            assert row is not None and row["last_error"] == "cancelled"
            assert row["attempts"] == row["max_attempts"] and row["locked_by"] is None
    finally:
        release.set()
        _join(stuck)


def test_cli_jobs_cancel(
    db_url: str, db: psycopg.Connection[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    with WorkerUtils(db_url) as utils:
        job = utils.add_job("later", {})
    assert jobs_main(["-c", db_url, "cancel", str(job.id), "--reason", "typo"]) == 0
    assert f"job {job.id}: cancelled" in capsys.readouterr().out
    assert _row(db, job.id)["last_error"] == "cancelled: typo"  # type: ignore[index]

    assert jobs_main(["-c", db_url, "cancel", str(job.id), "--json"]) == 1
    assert json.loads(capsys.readouterr().out) == {
        "job_id": job.id,
        "outcome": "finished",
        "pool_id": None,
    }
    assert jobs_main(["-c", db_url, "cancel", str(job.id + 99)]) == 1
    assert "no such job" in capsys.readouterr().err
    for bad in ("0", "abc", "-1"):
        with pytest.raises(SystemExit) as exited:
            jobs_main(["-c", db_url, "cancel", bad])
        assert exited.value.code == 2
        assert "a job id is a positive integer" in capsys.readouterr().err


def test_a_job_cancelled_in_the_local_buffer_never_starts(
    db_url: str, db: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="kongtask.jobs.supervisor")
    busy = threading.Event()
    release = threading.Event()
    ran: list[int] = []

    def work(payload: Any, helpers: Any) -> None:
        ran.append(helpers.job.id)
        busy.set()
        release.wait(DEADLINE_S)

    # A claim on the insert notice buffers the second job behind the busy slot (a
    # sized pool would leave it in the database for a pool with a free one).
    runner = _runner(db_url, {"work": work}, concurrency=1, size_claims=False)
    try:
        with recording(runner) as log, runner:
            first = runner.add_job("work", {})
            assert busy.wait(DEADLINE_S)
            waiting = runner.add_job("work", {})
            # -j 1 and the executor busy: the second job is claimed into the buffer.
            wait_until(lambda: _row(db, waiting.id)["locked_by"] is not None)  # type: ignore[index]
            with WorkerUtils(db_url) as utils:
                assert utils.cancel_job(waiting.id, "not now").outcome == "signalled"
            wait_until(
                lambda: any("will not start" in r.getMessage() for r in caplog.records),
                what="the pool to hear the cancel",
            )
            release.set()
            log.wait_for("job:failed")
            runner.join(DEADLINE_S)
    finally:
        release.set()
    assert ran == [first.id]
    row = _row(db, waiting.id)
    assert row is not None and row["last_error"] == "cancelled: not now"
    assert row["attempts"] == row["max_attempts"] and row["locked_by"] is None


def test_a_stuck_thread_does_not_hold_up_a_graceful_stop(db_url: str) -> None:
    release = threading.Event()
    stuck: list[threading.Thread] = []

    @kongtask.task(timeout_s=0.3)
    def stubborn(payload: Any, helpers: Any) -> None:
        stuck.append(threading.current_thread())
        release.wait(DEADLINE_S)

    runner = _runner(
        db_url, {"stubborn": stubborn}, concurrency=2, graceful_shutdown_abort_timeout_s=20.0
    )
    try:
        with recording(runner) as log:
            runner.start()
            runner.add_job("stubborn", {}, max_attempts=1)
            log.wait_for("job:failed")
            runner.join(DEADLINE_S)
            assert runner.load().stuck_threads == 1  # type: ignore[union-attr]
            started = time.monotonic()
            assert runner.stop(DEADLINE_S)
            # The drain waits for running jobs only; the stuck thread is not one.
            assert time.monotonic() - started < 10.0
            assert log.count("pool:gracefulShutdown:complete") == 1
    finally:
        release.set()
        _join(stuck)


def test_an_async_handler_past_its_timeout_is_cancelled_and_retried(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    cancelled = threading.Event()

    @kongtask.task(timeout_s=0.5)
    async def sleepy(payload: Any, helpers: Any) -> None:
        try:
            await asyncio.sleep(DEADLINE_S)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    runner = _runner(db_url, {"sleepy": sleepy})
    with recording(runner) as log, runner:
        job = runner.add_job("sleepy", {})
        log.wait_for("job:error")
        assert cancelled.is_set(), "the coroutine was not cancelled at its timeout"
        [error] = log.payloads("job:error")
        assert isinstance(error["error"], kongtask.JobTimeoutError)
        runner.join(DEADLINE_S)
    row = _row(db, job.id)
    assert row is not None and row["last_error"] == "timed out after 0.5 s"
    assert row["attempts"] == 1 and row["is_available"] is True and row["locked_by"] is None


def test_with_async_tasks_a_stubborn_plain_handler_frees_its_slot_too(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    # An async task in the map puts the executors in gated mode (a slot semaphore).
    release = threading.Event()
    ran: list[str] = []
    next_ran = threading.Event()

    @kongtask.task(timeout_s=0.5)
    def stubborn(payload: Any, helpers: Any) -> None:
        release.wait(DEADLINE_S)  # ignores its abort event

    async def quick(payload: Any, helpers: Any) -> None:
        ran.append("async")
        next_ran.set()

    runner = _runner(db_url, {"stubborn": stubborn, "quick": quick}, concurrency=1)
    try:
        with recording(runner) as log, runner:
            stuck = runner.add_job("stubborn", {}, max_attempts=1, priority=-1)
            log.wait_for("job:start")
            runner.add_job("quick", {})
            assert next_ran.wait(DEADLINE_S), "the timed-out plain job kept its slot"
            load = runner.load()
            assert load is not None and load.stuck_threads == 1
            release.set()
            wait_until(lambda: runner.load().stuck_threads == 0, what="the stuck thread to end")  # type: ignore[union-attr]
            runner.join(DEADLINE_S)
            assert log.count("job:failed") == 1 and log.count("job:success") == 1
    finally:
        release.set()
    row = _row(db, stuck.id)
    assert row is not None and row["last_error"] == "timed out after 0.5 s"
    assert ran == ["async"]


def _join(threads: list[threading.Thread]) -> None:
    """Wait for released handlers' threads: their late return is logged, and that must
    happen while the test's output is still open."""
    for thread in threads:
        thread.join(DEADLINE_S)
        assert not thread.is_alive(), f"{thread.name} did not end"
