"""The worker's job semantics against real PostgreSQL (graphile-worker 0.17.3's)."""

from __future__ import annotations

import math
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from kongtask.runner import Runner, run, run_once

from .worker_support import add_jobs_sql, capture_contexts, jobs, locked_queues, recording


def _once(db_url: str, tasks: dict[str, Any], **options: Any) -> Runner:
    options.setdefault("install_signal_handlers", False)
    return run_once(tasks=tasks, connection_string=db_url, **options)


def test_success_deletes_the_job_and_failure_records_error_and_backoff(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    seen: list[Any] = []

    def fail(payload: Any, helpers: Any) -> None:
        raise RuntimeError(f"nope {payload['n']}")

    add_jobs_sql(
        db, [{"identifier": "ok", "payload": {"n": 1}}, {"identifier": "fail", "payload": {"n": 2}}]
    )
    runner = _once(db_url, {"ok": lambda payload, helpers: seen.append(payload), "fail": fail})
    assert runner.pool_id is not None and runner.pool_id.startswith("otpool-")
    assert len(runner.pool_id) == len("otpool-") + 18
    assert seen == [{"n": 1}]
    [row] = jobs(db)
    assert row["task_identifier"] == "fail"
    assert row["attempts"] == 1
    assert row["last_error"] == "nope 2"
    assert row["locked_at"] is None and row["locked_by"] is None
    assert row["delay_s"] == pytest.approx(math.exp(1), abs=0.01)

    # Make it runnable again: the second failure waits e^2 seconds.
    db.execute("update graphile_worker._private_jobs set run_at = now()")
    _once(db_url, {"fail": fail})
    [row] = jobs(db)
    assert row["attempts"] == 2
    assert row["delay_s"] == pytest.approx(math.exp(2), abs=0.01)


def test_permanent_failure_at_max_attempts(db_url: str, db: psycopg.Connection[Any]) -> None:
    def fail(payload: Any, helpers: Any) -> None:
        raise ValueError("always")

    add_jobs_sql(db, [{"identifier": "fail", "payload": {}, "max_attempts": 2}])
    failed: list[Any] = []
    for _ in range(3):
        runner = Runner(
            tasks={"fail": fail}, connection_string=db_url, once=True, install_signal_handlers=False
        )
        with recording(runner) as log:
            runner.start()
            runner.wait()
        failed += log.payloads("job:failed")
        db.execute("update graphile_worker._private_jobs set run_at = now()")
    [row] = jobs(db)
    assert row["attempts"] == 2
    assert row["is_available"] is False
    assert len(failed) == 1 and failed[0]["job"].attempts == 2


def test_unknown_tasks_are_never_touched(db_url: str, db: psycopg.Connection[Any]) -> None:
    add_jobs_sql(
        db, [{"identifier": "someone_elses", "payload": {}}, {"identifier": "mine", "payload": {}}]
    )
    before = [row for row in jobs(db) if row["task_identifier"] == "someone_elses"]
    _once(db_url, {"mine": lambda payload, helpers: None})
    after = jobs(db)
    assert [row["task_identifier"] for row in after] == ["someone_elses"]
    assert after[0]["attempts"] == 0 and after[0]["updated_at"] == before[0]["updated_at"]


def test_forbidden_flags_skip_flagged_jobs(db_url: str, db: psycopg.Connection[Any]) -> None:
    ran: list[Any] = []
    add_jobs_sql(
        db,
        [
            {"identifier": "t", "payload": {"n": 1}, "flags": ["slow"]},
            {"identifier": "t", "payload": {"n": 2}, "flags": ["fast"]},
            {"identifier": "t", "payload": {"n": 3}},
        ],
    )
    _once(
        db_url, {"t": lambda payload, helpers: ran.append(payload["n"])}, forbidden_flags=["slow"]
    )
    assert sorted(ran) == [2, 3]
    assert [row["flags"] for row in jobs(db)] == [{"slow": True}]


def test_priority_then_run_at_order(db_url: str, db: psycopg.Connection[Any]) -> None:
    now = datetime.now(UTC)
    specs = [
        {
            "identifier": "t",
            "payload": {"name": "late-low"},
            "priority": 0,
            "run_at": (now - timedelta(seconds=10)).isoformat(),
        },
        {
            "identifier": "t",
            "payload": {"name": "early-low"},
            "priority": 0,
            "run_at": (now - timedelta(seconds=20)).isoformat(),
        },
        {
            "identifier": "t",
            "payload": {"name": "urgent"},
            "priority": -5,
            "run_at": (now - timedelta(seconds=1)).isoformat(),
        },
        {
            "identifier": "t",
            "payload": {"name": "lazy"},
            "priority": 5,
            "run_at": (now - timedelta(seconds=30)).isoformat(),
        },
        {
            "identifier": "t",
            "payload": {"name": "future"},
            "run_at": (now + timedelta(hours=1)).isoformat(),
        },
    ]
    add_jobs_sql(db, specs)
    order: list[str] = []
    _once(db_url, {"t": lambda payload, helpers: order.append(payload["name"])}, local_queue_size=2)
    assert order == ["urgent", "early-low", "late-low", "lazy"]
    assert [row["payload"]["name"] for row in jobs(db)] == ["future"]


def test_named_queues_never_overlap_under_concurrency_8(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    lock = threading.Lock()
    active: dict[str, int] = {}
    overlaps: list[str] = []
    order: dict[str, list[int]] = {}
    parallel_peak = [0]
    running = [0]
    work = threading.Event()

    def task(payload: Any, helpers: Any) -> None:
        queue = helpers.get_queue_name()
        with lock:
            running[0] += 1
            parallel_peak[0] = max(parallel_peak[0], running[0])
            if queue is not None:
                if active.get(queue):
                    overlaps.append(queue)
                active[queue] = active.get(queue, 0) + 1
                order.setdefault(queue, []).append(payload["n"])
        work.wait(0.002)  # a little work, so overlaps would have a chance to show
        with lock:
            running[0] -= 1
            if queue is not None:
                active[queue] -= 1

    specs = [{"identifier": "t", "payload": {"n": n}, "queue_name": f"q{n % 3}"} for n in range(60)]
    specs += [{"identifier": "t", "payload": {"n": 100 + n}} for n in range(40)]
    add_jobs_sql(db, specs)
    _once(db_url, {"t": task}, concurrency=8, local_queue_size=32)
    assert overlaps == []
    assert jobs(db) == []
    assert locked_queues(db) == 0
    for queue, numbers in order.items():
        assert numbers == sorted(numbers), f"queue {queue} ran out of order"
        assert len(numbers) == 20
    assert parallel_peak[0] > 1


def test_batch_job_retries_only_failed_items(db_url: str, db: psycopg.Connection[Any]) -> None:
    def batch(payload: list[Any], helpers: Any) -> list[Any]:
        return [ValueError(f"bad {item}") if item % 2 else item for item in payload]

    add_jobs_sql(db, [{"identifier": "batch", "payload": [1, 2, 3, 4]}])
    runner = Runner(
        tasks={"batch": batch}, connection_string=db_url, once=True, install_signal_handlers=False
    )
    with recording(runner) as log:
        runner.start()
        runner.wait()
    [row] = jobs(db)
    assert row["payload"] == [1, 3]
    assert row["last_error"] == "Batch failures:\nbad 1\nbad 3"
    assert row["attempts"] == 1
    [error] = log.payloads("job:error")
    assert [str(e) for e in error["batch_job_errors"]] == ["bad 1", "bad 3"]


def test_helpers(db_url: str, db: psycopg.Connection[Any]) -> None:
    results: dict[str, Any] = {}

    def first(payload: Any, helpers: Any) -> None:
        results["job_id"] = helpers.job.id
        results["queue"] = helpers.get_queue_name()
        results["query"] = helpers.query("select %s::int + 1 as answer", (41,))
        with helpers.with_connection() as conn:
            results["conn"] = conn.execute("select 7").fetchone()[0]
        results["added"] = helpers.add_job("second", {"from": helpers.job.id}).id
        results["abort"] = helpers.abort_event.is_set()
        helpers.logger.info("running")

    def second(payload: Any, helpers: Any) -> None:
        results["second"] = payload
        results["no_queue"] = helpers.get_queue_name()

    add_jobs_sql(db, [{"identifier": "first", "payload": {}, "queue_name": "named"}])
    _once(db_url, {"first": first, "second": second})
    assert results["queue"] == "named"
    assert results["query"] == [{"answer": 42}]
    assert results["conn"] == 7
    assert results["second"] == {"from": results["job_id"]}
    assert results["no_queue"] is None
    assert results["abort"] is False
    assert jobs(db) == []


def test_live_worker_picks_up_new_jobs_via_listen(db_url: str, db: psycopg.Connection[Any]) -> None:
    done = threading.Event()
    # A long poll interval: only LISTEN/NOTIFY can make this fast.
    runner = run(
        tasks={"t": lambda payload, helpers: done.set()},
        connection_string=db_url,
        poll_interval_s=600,
        install_signal_handlers=False,
    )
    with runner, recording(runner) as log:
        if not runner.pool_id or not runner.pool_id.startswith("pool-"):
            pytest.fail(f"unexpected pool id {runner.pool_id}")
        log_wait = log.wait_for
        runner.join(10)
        db.execute("select graphile_worker.add_job('t', '{}')")
        assert done.wait(10)
        log_wait("job:complete")
        runner.join(10)
    assert jobs(db) == []


def test_unsupported_task_fails_the_job(
    db_url: str, db: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Cannot happen through the API (only our own task ids are claimed), so
    # remove the handler behind the Runner's back once it has registered it.
    contexts = capture_contexts(monkeypatch)
    runner = run(
        tasks={"t": lambda payload, helpers: None},
        connection_string=db_url,
        install_signal_handlers=False,
    )
    with runner, recording(runner) as log:
        runner.join(10)
        [ctx] = contexts
        del ctx.tasks["t"]  # type: ignore[attr-defined]  # a dict behind the Mapping
        runner.add_job("t", {})
        log.wait_for("job:complete")
        runner.join(10)
    [row] = jobs(db)
    assert row["last_error"] == "Unsupported task 't'"
    assert row["locked_by"] is None
