"""WorkerUtils against real PostgreSQL, with graphile-worker 0.17.3's semantics."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

import kongtask
from kongtask import InvalidJobError, JobSpec, WorkerUtils

FUTURE = datetime(2200, 1, 1, tzinfo=UTC)


@pytest.fixture
def utils(db_url: str) -> Iterator[WorkerUtils]:
    with WorkerUtils(db_url) as worker_utils:
        yield worker_utils


def count(db: psycopg.Connection[Any], table: str) -> int:
    row = db.execute(f"select count(*) from graphile_worker.{table}").fetchone()
    assert row is not None
    return int(row[0])


def job_row(db: psycopg.Connection[Any], job_id: int) -> dict[str, Any] | None:
    with db.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute(
            "select * from graphile_worker._private_jobs where id = %s", (job_id,)
        ).fetchone()


def lock(db: psycopg.Connection[Any], job_id: int, by: str = "pool-test") -> None:
    db.execute(
        "update graphile_worker._private_jobs set locked_at = now(), locked_by = %s, "
        "attempts = attempts + 1 where id = %s",
        (by, job_id),
    )


def test_add_job_returns_the_row_with_defaults(
    utils: WorkerUtils, db: psycopg.Connection[Any]
) -> None:
    before = datetime.now(UTC)
    job = utils.add_job("send_email", {"to": "a@example.com"})
    assert job.task_identifier == "send_email"
    assert job.payload == {"to": "a@example.com"}
    assert job.job_queue_id is None
    assert (job.priority, job.attempts, job.max_attempts, job.revision) == (0, 0, 25, 0)
    assert job.key is None and job.flags is None and job.locked_at is None
    assert job.is_available
    assert before - timedelta(seconds=5) <= job.run_at <= datetime.now(UTC) + timedelta(seconds=5)
    assert count(db, "_private_tasks") == 1


def test_add_job_without_payload_stores_empty_object(utils: WorkerUtils) -> None:
    assert utils.add_job("noop").payload == {}


def test_queue_and_task_rows_created_on_demand(
    utils: WorkerUtils, db: psycopg.Connection[Any]
) -> None:
    first = utils.add_job("a", queue_name="q1")
    second = utils.add_job("a", queue_name="q1")
    third = utils.add_job("b", queue_name="q2")
    assert first.job_queue_id == second.job_queue_id != third.job_queue_id
    assert count(db, "_private_job_queues") == 2
    assert count(db, "_private_tasks") == 2
    names = db.execute("select queue_name from graphile_worker.jobs order by id").fetchall()
    assert [row[0] for row in names] == ["q1", "q1", "q2"]


def test_flags_are_stored_as_an_object(utils: WorkerUtils) -> None:
    job = utils.add_job("flagged", flags=["slow", "gpu"])
    assert job.flags == {"slow": True, "gpu": True}


def test_job_key_walk_replace_preserve_dedupe(utils: WorkerUtils) -> None:
    """The sequence graphile-worker's own tests use for one key and four modes."""
    run_at = [datetime(2200 + i, 1, 1, tzinfo=UTC) for i in range(4)]
    first = utils.add_job("task", {"a": 1}, job_key="UNIQUE", run_at=run_at[0])
    assert (first.revision, first.payload, first.run_at) == (0, {"a": 1}, run_at[0])

    second = utils.add_job(
        "task", {"a": 2}, job_key="UNIQUE", run_at=run_at[1], job_key_mode="preserve_run_at"
    )
    assert second.id == first.id
    assert (second.revision, second.payload, second.run_at) == (1, {"a": 2}, run_at[0])

    third = utils.add_job(
        "task", {"a": 3}, job_key="UNIQUE", run_at=run_at[2], job_key_mode="unsafe_dedupe"
    )
    assert third.id == first.id
    assert (third.revision, third.payload, third.run_at) == (2, {"a": 2}, run_at[0])

    fourth = utils.add_job(
        "task", {"a": 4}, job_key="UNIQUE", run_at=run_at[3], job_key_mode="replace"
    )
    assert fourth.id == first.id
    assert (fourth.revision, fourth.payload, fourth.run_at) == (3, {"a": 4}, run_at[3])


def test_replace_reverts_omitted_fields_to_defaults(utils: WorkerUtils) -> None:
    utils.add_job("task", {"x": 1}, job_key="k", queue_name="q", max_attempts=3, priority=5)
    job = utils.add_job("task", job_key="k")
    assert (job.job_queue_id, job.max_attempts, job.priority, job.payload) == (None, 25, 0, {})


def test_four_replaces_make_one_job(utils: WorkerUtils, db: psycopg.Connection[Any]) -> None:
    for i in range(4):
        job = utils.add_job("task", {"i": i}, job_key="same")
    assert job.revision == 3 and job.payload == {"i": 3}
    assert count(db, "_private_jobs") == 1


def test_array_payloads_concatenate_on_a_key(utils: WorkerUtils) -> None:
    utils.add_jobs([JobSpec("batch", [1, 2], job_key="acc")])
    (job,) = utils.add_jobs([{"identifier": "batch", "payload": [3], "job_key": "acc"}])
    assert job.payload == [1, 2, 3]
    replaced = utils.add_job("batch", {"not": "an array"}, job_key="acc")
    assert replaced.payload == {"not": "an array"}


def test_preserve_run_at_keeps_unattempted_run_at(utils: WorkerUtils) -> None:
    utils.add_jobs([JobSpec("t", job_key="p", run_at=FUTURE)])
    (job,) = utils.add_jobs(
        [JobSpec("t", job_key="p", run_at=FUTURE + timedelta(days=1))],
        job_key_preserve_run_at=True,
    )
    assert job.run_at == FUTURE


def test_locked_job_keeps_running_but_loses_its_key(
    utils: WorkerUtils, db: psycopg.Connection[Any]
) -> None:
    original = utils.add_job("task", {"v": 1}, job_key="busy")
    lock(db, original.id)
    fresh = utils.add_job("task", {"v": 2}, job_key="busy")
    assert fresh.id != original.id
    assert fresh.key == "busy" and fresh.payload == {"v": 2}
    old = job_row(db, original.id)
    assert old is not None
    assert old["key"] is None
    assert old["locked_by"] == "pool-test"
    assert old["attempts"] == old["max_attempts"]


def test_jobs_insert_notification(utils: WorkerUtils, db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute('listen "jobs:insert"')
        utils.add_job("task")
        utils.add_jobs([JobSpec("task"), JobSpec("task")])
        payloads = []
        for notify in listener.notifies(timeout=5):
            payloads.append(json.loads(notify.payload))
            if len(payloads) == 2:
                break
    assert [p["count"] for p in payloads] == [1, 2]
    assert all(isinstance(p["r"], float) for p in payloads)


def test_add_jobs_returns_in_input_order(utils: WorkerUtils) -> None:
    jobs = utils.add_jobs([JobSpec("t", {"n": n}, priority=n % 3) for n in range(10)])
    assert [job.payload["n"] for job in jobs] == list(range(10))
    assert utils.add_jobs([]) == []


def test_remove_job(utils: WorkerUtils, db: psycopg.Connection[Any]) -> None:
    job = utils.add_job("t", job_key="gone")
    removed = utils.remove_job("gone")
    assert removed is not None and removed.id == job.id
    assert job_row(db, job.id) is None
    assert utils.remove_job("gone") is None

    locked = utils.add_job("t", job_key="held")
    lock(db, locked.id)
    kept = utils.remove_job("held")
    assert kept is not None and kept.id == locked.id
    row = job_row(db, locked.id)
    assert row is not None and row["key"] is None and row["attempts"] == row["max_attempts"]


def test_complete_jobs_skips_locked(utils: WorkerUtils, db: psycopg.Connection[Any]) -> None:
    free, held = utils.add_job("t"), utils.add_job("t")
    lock(db, held.id)
    done = utils.complete_jobs([free.id, held.id])
    assert [job.id for job in done] == [free.id]
    assert job_row(db, free.id) is None and job_row(db, held.id) is not None


def test_permanently_fail_jobs(utils: WorkerUtils) -> None:
    job = utils.add_job("t")
    (failed,) = utils.permanently_fail_jobs([job.id], "no longer wanted")
    assert failed.last_error == "no longer wanted"
    assert failed.attempts == failed.max_attempts and failed.is_permanently_failed
    (default,) = utils.permanently_fail_jobs([utils.add_job("t").id])
    assert default.last_error == "Manually marked as failed"


def test_reschedule_jobs_zero_is_a_value(utils: WorkerUtils) -> None:
    job = utils.add_job("t", priority=7, max_attempts=9)
    utils.reschedule_jobs([job.id], attempts=4)
    (moved,) = utils.reschedule_jobs([job.id], run_at=FUTURE, priority=0, attempts=0)
    assert (moved.run_at, moved.priority, moved.attempts, moved.max_attempts) == (
        FUTURE,
        0,
        0,
        9,
    )
    (unchanged,) = utils.reschedule_jobs([job.id])
    assert (unchanged.priority, unchanged.run_at) == (0, FUTURE)


def test_force_unlock_workers(utils: WorkerUtils, db: psycopg.Connection[Any]) -> None:
    mine = utils.add_job("t", queue_name="serial")
    other = utils.add_job("t")
    lock(db, mine.id, "pool-dead")
    lock(db, other.id, "pool-alive")
    db.execute(
        "update graphile_worker._private_job_queues set locked_at = now(), locked_by = 'pool-dead'"
    )
    utils.force_unlock_workers(["pool-dead"])
    mine_row, other_row = job_row(db, mine.id), job_row(db, other.id)
    assert mine_row is not None and mine_row["locked_by"] is None
    assert other_row is not None and other_row["locked_by"] == "pool-alive"
    queue = db.execute("select locked_by from graphile_worker._private_job_queues").fetchone()
    assert queue == (None,)


def test_cleanup_tasks(utils: WorkerUtils, db: psycopg.Connection[Any]) -> None:
    utils.add_job("keepme")
    dead = utils.add_job("dead_task", queue_name="dead_queue")
    utils.complete_jobs([dead.id])
    failed = utils.add_job("failing")
    utils.permanently_fail_jobs([failed.id])
    db.execute("insert into graphile_worker._private_tasks (identifier) values ('kept_idle')")

    assert utils.cleanup() == {"GC_JOB_QUEUES": 1}
    assert count(db, "_private_job_queues") == 0
    assert utils.cleanup(["DELETE_PERMAFAILED_JOBS"]) == {"DELETE_PERMAFAILED_JOBS": 1}
    removed = utils.cleanup(["GC_TASK_IDENTIFIERS"], task_identifiers_to_keep=["kept_idle"])
    assert removed == {"GC_TASK_IDENTIFIERS": 2}  # dead_task and failing
    left = {row[0] for row in db.execute("select identifier from graphile_worker._private_tasks")}
    assert left == {"keepme", "kept_idle"}


def test_cleanup_rejects_unknown_task_names(utils: WorkerUtils) -> None:
    with pytest.raises(kongtask.ConfigurationError, match="you provided: 'GC_EVERYTHING'"):
        utils.cleanup(["GC_EVERYTHING"])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"job_key_mode": "merge", "job_key": "k"}, "job_key_mode"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": 40000}, "max_attempts"),
        ({"job_key": "k" * 513}, "job_key"),
        ({"job_key": ""}, "job_key"),
        ({"payload": {"when": datetime.now(UTC)}}, "payload"),
        ({"payload": {"x": math.nan}}, "payload"),
        ({"priority": True}, "priority"),
        ({"run_at": datetime(2030, 1, 1)}, "run_at"),
        ({"flags": "slow"}, "flags"),
        ({"queue_name": "q" * 129}, "queue_name"),
    ],
)
def test_bad_arguments_raise_before_touching_the_database(
    utils: WorkerUtils, db: psycopg.Connection[Any], kwargs: dict[str, Any], field: str
) -> None:
    payload = kwargs.pop("payload", None)
    with pytest.raises(InvalidJobError) as info:
        utils.add_job("task", payload, **kwargs)
    assert info.value.field == field
    assert field in str(info.value)
    assert count(db, "_private_jobs") == 0
    assert count(db, "_private_tasks") == 0


def test_add_jobs_rejects_a_bad_spec_without_writing_any(
    utils: WorkerUtils, db: psycopg.Connection[Any]
) -> None:
    with pytest.raises(InvalidJobError, match="index 1"):
        utils.add_jobs([JobSpec("ok"), {"identifier": "bad", "colour": "red"}])
    with pytest.raises(InvalidJobError, match="more than once"):
        utils.add_jobs([JobSpec("a", job_key="k"), JobSpec("b", job_key="k")])
    with pytest.raises(InvalidJobError, match="job_key_preserve_run_at"):
        utils.add_jobs([JobSpec("a", job_key="k", job_key_mode="replace")])
    assert count(db, "_private_jobs") == 0


def test_module_level_add_job(db_url: str, db: psycopg.Connection[Any]) -> None:
    job = kongtask.add_job("hello", {"n": 1}, connection_string=db_url, priority=2)
    assert job.priority == 2
    assert count(db, "_private_jobs") == 1


def test_custom_schema_name(empty_db_url: str) -> None:
    schema = 'My "odd" schema'
    with WorkerUtils(empty_db_url, schema=schema) as utils:
        job = utils.add_job("t", {"ok": True}, queue_name="q")
        assert job.task_identifier == "t"
        assert utils.remove_job("missing") is None
        assert utils.cleanup() == {"GC_JOB_QUEUES": 0}
