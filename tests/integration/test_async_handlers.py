"""``async def`` handlers against real PostgreSQL: the Runner's event loop, slots, helpers."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import psycopg
import pytest

import kongtask
from kongtask.helpers import AsyncHelpers
from kongtask.runner import Runner, run_once

from .worker_support import add_jobs_sql, jobs, recording


def _once(db_url: str, tasks: dict[str, Any], **options: Any) -> Runner:
    options.setdefault("install_signal_handlers", False)
    return run_once(tasks=tasks, connection_string=db_url, **options)


def test_sync_and_async_handlers_mix_in_one_task_map(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    ran: list[tuple[str, int, str]] = []

    def plain(payload: Any, helpers: Any) -> None:
        ran.append(("plain", payload["n"], threading.current_thread().name))

    async def coro(payload: Any, helpers: Any) -> None:
        await asyncio.sleep(0.01)
        assert isinstance(helpers, AsyncHelpers)
        ran.append(("coro", payload["n"], threading.current_thread().name))

    @kongtask.task(name="declared_coro")
    async def declared_coro(payload: Any, helpers: Any) -> None:
        ran.append(("declared", payload["n"], threading.current_thread().name))

    add_jobs_sql(
        db,
        [
            {"identifier": name, "payload": {"n": n}}
            for n in range(5)
            for name in ("plain", "coro", "declared_coro")
        ],
    )
    runner = Runner(
        tasks={"plain": plain, "coro": coro, "declared_coro": declared_coro},
        connection_string=db_url,
        concurrency=4,
        once=True,
        install_signal_handlers=False,
    )
    with recording(runner) as log:
        runner.start()
        assert runner.wait(30)
    assert sorted((kind, n) for kind, n, _ in ran) == sorted(
        (kind, n) for n in range(5) for kind in ("plain", "coro", "declared")
    )
    # Plain handlers run on executor threads, async ones on the Runner's loop thread.
    assert {thread for kind, _, thread in ran if kind == "plain"} <= {
        f"kongtask-{worker_id}" for worker_id in runner.worker_ids
    }
    assert {thread for kind, _, thread in ran if kind != "plain"} == {
        f"kongtask-loop-{runner.pool_id}"
    }
    assert jobs(db) == []
    assert log.count("job:start") == 15
    assert log.count("job:success") == 15
    assert log.count("job:complete") == 15


def test_an_async_failure_is_recorded_and_retried(db_url: str, db: psycopg.Connection[Any]) -> None:
    calls: list[int] = []

    async def flaky(payload: Any, helpers: Any) -> None:
        calls.append(helpers.job.attempts)
        await asyncio.sleep(0)
        if helpers.job.attempts == 1:
            raise RuntimeError("first attempt fails")

    add_jobs_sql(db, [{"identifier": "flaky", "payload": {}}])
    runner = Runner(
        tasks={"flaky": flaky}, connection_string=db_url, once=True, install_signal_handlers=False
    )
    with recording(runner) as log:
        runner.start()
        assert runner.wait(30)
    [row] = jobs(db)
    assert row["attempts"] == 1
    assert row["last_error"] == "first attempt fails"
    assert row["locked_by"] is None
    [error] = log.payloads("job:error")
    assert isinstance(error["error"], RuntimeError)
    assert log.count("job:failed") == 0

    db.execute("update graphile_worker._private_jobs set run_at = now()")
    _once(db_url, {"flaky": flaky})
    assert calls == [1, 2]
    assert jobs(db) == []


def test_an_async_batch_fails_only_the_items_that_are_exceptions(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    async def batch(payload: list[Any], helpers: Any) -> list[Any]:
        await asyncio.sleep(0)
        return [ValueError(f"bad {item}") if item % 2 else item for item in payload]

    add_jobs_sql(db, [{"identifier": "batch", "payload": [1, 2, 3, 4]}])
    runner = Runner(
        tasks={"batch": batch}, connection_string=db_url, once=True, install_signal_handlers=False
    )
    with recording(runner) as log:
        runner.start()
        assert runner.wait(30)
    [row] = jobs(db)
    assert row["payload"] == [1, 3]
    assert row["attempts"] == 1
    assert "bad 1" in row["last_error"] and "bad 3" in row["last_error"]
    [error] = log.payloads("job:error")
    assert [str(e) for e in error["batch_job_errors"]] == ["bad 1", "bad 3"]


def test_500_async_jobs_run_at_once_on_few_threads(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    count = 500
    lock = threading.Lock()
    in_flight = 0
    most_in_flight = 0
    done = threading.Event()
    finished = 0

    async def nap(payload: Any, helpers: Any) -> None:
        nonlocal in_flight, most_in_flight, finished
        with lock:
            in_flight += 1
            most_in_flight = max(most_in_flight, in_flight)
        await asyncio.sleep(0.5)
        with lock:
            in_flight -= 1
            finished += 1
            if finished == count:
                done.set()

    add_jobs_sql(db, [{"identifier": "nap", "payload": {"n": n}} for n in range(count)])
    peak_threads = threading.active_count()
    stop_sampling = threading.Event()

    def sample() -> None:
        nonlocal peak_threads
        while not stop_sampling.wait(0.005):
            peak_threads = max(peak_threads, threading.active_count())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    runner = Runner(
        tasks={"nap": nap},
        connection_string=db_url,
        concurrency=count,
        install_signal_handlers=False,
    )
    started = time.monotonic()
    try:
        with runner:
            assert done.wait(20), f"only {finished} of {count} jobs finished"
            elapsed = time.monotonic() - started
            runner.join(20)
    finally:
        stop_sampling.set()
        sampler.join(5)
    assert elapsed < 10.0, f"{count} jobs took {elapsed:.1f} s"
    # The slots let the jobs overlap: far more than one thread's worth ran at once.
    assert most_in_flight >= count // 2, most_in_flight
    assert peak_threads < 100, peak_threads
    assert jobs(db) == []


def test_graceful_shutdown_waits_for_async_jobs_in_flight(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    running = threading.Event()
    released = threading.Event()

    async def slow(payload: Any, helpers: Any) -> None:
        running.set()
        # Still running when the executors are released and the drain begins.
        deadline = time.monotonic() + 30
        while not released.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)

    def on_release(sender: Any, **_: Any) -> None:
        released.set()

    add_jobs_sql(db, [{"identifier": "slow", "payload": {}}])
    runner = Runner(
        tasks={"slow": slow},
        connection_string=db_url,
        concurrency=4,  # free slots: the taking threads end while the job still runs
        graceful_shutdown_abort_timeout_s=20,
        install_signal_handlers=False,
    )
    runner.events.worker_release.connect(on_release, sender=runner, weak=False)
    try:
        with recording(runner) as log:
            runner.start()
            assert running.wait(30)
            assert runner.stop(30)
    finally:
        runner.events.worker_release.disconnect(on_release)
    assert released.is_set()
    assert jobs(db) == []
    assert log.count("job:success") == 1
    assert log.count("job:error") == 0


def test_at_the_abort_timeout_async_jobs_are_signalled_cancelled_and_failed_back(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    running = threading.Event()
    seen: list[str] = []

    async def stuck(payload: Any, helpers: Any) -> None:
        running.set()
        await helpers.aborted()
        seen.append("aborted")
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    add_jobs_sql(db, [{"identifier": "stuck", "payload": {}}])
    runner = Runner(
        tasks={"stuck": stuck},
        connection_string=db_url,
        graceful_shutdown_abort_timeout_s=0.3,
        install_signal_handlers=False,
    )
    with recording(runner) as log:
        runner.start()
        assert running.wait(30)
        assert runner.stop(30)
    assert seen == ["aborted", "cancelled"]
    [row] = jobs(db)
    assert row["attempts"] == 1
    assert row["locked_by"] is None
    assert row["last_error"].startswith("Worker pool is shutting down gracefully")
    # The shutdown failed it back; the cancelled run's own outcome is ignored.
    assert log.count("job:error") == 0


def test_async_helpers_query_and_add_jobs_without_blocking_the_loop(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    seen: dict[str, Any] = {}

    async def parent(payload: Any, helpers: AsyncHelpers) -> None:
        seen["rows"] = await helpers.query_async("select %s::int as n", (payload["n"],))
        async with helpers.connection_async() as conn:
            cursor = await conn.execute("select current_setting('application_name')")
            seen["app"] = (await cursor.fetchone())[0]  # type: ignore[index]
        job = await helpers.add_job_async("child", {"from": payload["n"]}, queue_name="q1")
        more = await helpers.add_jobs_async(
            [{"identifier": "child", "payload": {"k": 1}}, {"identifier": "child"}]
        )
        seen["ids"] = [job.id, *(j.id for j in more)]
        seen["queue"] = await helpers.get_queue_name_async(job.job_queue_id)

    add_jobs_sql(db, [{"identifier": "parent", "payload": {"n": 7}}])
    runner = _once(db_url, {"parent": parent})
    assert seen["rows"] == [{"n": 7}]
    assert seen["app"] == runner.pool_id
    assert seen["queue"] == "q1"
    children = jobs(db)
    assert [row["id"] for row in children] == seen["ids"]
    assert [row["payload"] for row in children] == [{"from": 7}, {"k": 1}, {}]


@pytest.mark.parametrize("concurrency", [1, 3])
def test_async_jobs_never_exceed_concurrency(
    db_url: str, db: psycopg.Connection[Any], concurrency: int
) -> None:
    lock = threading.Lock()
    in_flight = 0
    most = 0

    async def nap(payload: Any, helpers: Any) -> None:
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)
        await asyncio.sleep(0.02)
        with lock:
            in_flight -= 1

    def plain(payload: Any, helpers: Any) -> None:
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)
        time.sleep(0.02)
        with lock:
            in_flight -= 1

    add_jobs_sql(
        db,
        [{"identifier": "nap", "payload": {}} for _ in range(20)]
        + [{"identifier": "plain", "payload": {}} for _ in range(5)],
    )
    _once(db_url, {"nap": nap, "plain": plain}, concurrency=concurrency)
    assert jobs(db) == []
    assert most == concurrency


def test_plain_jobs_holding_every_thread_add_one_so_async_jobs_keep_flowing(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    async_done = threading.Event()
    finished = 0
    lock = threading.Lock()

    def hold(payload: Any, helpers: Any) -> None:
        # Both plain jobs hold their thread until every async job has run.
        assert async_done.wait(20), "async jobs did not run while plain ones held the threads"

    async def quick(payload: Any, helpers: Any) -> None:
        nonlocal finished
        await asyncio.sleep(0.01)
        with lock:
            finished += 1
            if finished == 10:
                async_done.set()

    add_jobs_sql(
        db,
        [{"identifier": "hold", "payload": {}, "priority": -1} for _ in range(2)]
        + [{"identifier": "quick", "payload": {}} for _ in range(10)],
    )
    runner = _once(db_url, {"hold": hold, "quick": quick}, concurrency=8)
    assert jobs(db) == []
    # Two threads to begin with, one added when both were inside plain handlers.
    assert len(runner.worker_ids) == 3


def test_async_crash_suspects_run_marked_and_one_at_a_time(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    from kongtask.jobs.liveness import SUSPECT_PREFIX

    lock = threading.Lock()
    in_flight = 0
    most = 0
    marks: list[Any] = []

    async def suspect(payload: Any, helpers: AsyncHelpers) -> None:
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)
        rows = await helpers.query_async(
            "select running_pool from graphile_worker._kongtask_job_crashes where job_id = %s",
            (helpers.job.id,),
        )
        marks.append(rows[0]["running_pool"] if rows else None)
        await asyncio.sleep(0.05)
        with lock:
            in_flight -= 1

    add_jobs_sql(db, [{"identifier": "suspect", "payload": {"n": n}} for n in range(3)])
    db.execute(
        "update graphile_worker._private_jobs set last_error = %s",
        (SUSPECT_PREFIX + " (test)",),
    )
    runner = _once(db_url, {"suspect": suspect}, concurrency=4)
    assert marks == [runner.pool_id] * 3
    assert most == 1
    assert jobs(db) == []


def test_kill_cancels_async_jobs_at_once_and_fails_them_back(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    running = threading.Event()
    cancelled = threading.Event()

    async def stuck(payload: Any, helpers: Any) -> None:
        running.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    add_jobs_sql(db, [{"identifier": "stuck", "payload": {}}])
    runner = Runner(
        tasks={"stuck": stuck},
        connection_string=db_url,
        graceful_shutdown_abort_timeout_s=60,
        install_signal_handlers=False,
    )
    runner.start()
    assert running.wait(30)
    started = time.monotonic()
    assert runner.kill(30)
    assert time.monotonic() - started < 30
    assert cancelled.is_set()
    [row] = jobs(db)
    assert row["attempts"] == 1
    assert row["locked_by"] is None
    assert row["last_error"] == "Forced worker shutdown"
