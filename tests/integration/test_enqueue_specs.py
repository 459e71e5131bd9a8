"""``add_job_specs_on``: many jobs, each as its own ``add_job``, in the caller's transaction.

The cron writer adds its firings' jobs through this door, in the same
transaction that claims the firings; these tests pin down what it promises on
real PostgreSQL: jobs come back in input order, keyed specs replace one
another in order with their own ``job_key_mode``, task rows created by the
very statement are named, and a bad spec is refused before anything is written.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from kongtask import InvalidJobError, JobSpec
from kongtask.db.statements import Queries
from kongtask.jobs.enqueue import add_job_specs_on

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def rows(db: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return db.execute(
        "select tasks.identifier, jobs.key, jobs.run_at, jobs.payload, jobs.flags, "
        "jobs.priority from graphile_worker._private_jobs as jobs "
        "join graphile_worker._private_tasks as tasks on tasks.id = jobs.task_id "
        "order by jobs.id"
    ).fetchall()


def test_jobs_come_back_in_input_order_with_keys_applied_in_turn(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    specs = [
        JobSpec("brand_new_task", {"n": 0}, run_at=T0),
        JobSpec("keyed", {"n": 1}, run_at=T0, job_key="k"),
        JobSpec("plain", {"n": 2}, run_at=T0 + timedelta(minutes=1), flags=["f"]),
        # Same key again: replaces the job the spec above just added.
        JobSpec("keyed", {"n": 3}, run_at=T0 + timedelta(minutes=2), job_key="k", flags=["g"]),
        # preserve_run_at keeps the replaced job's run_at and takes the payload.
        JobSpec(
            "kept",
            {"n": 4},
            run_at=T0,
            job_key="p",
            job_key_mode="preserve_run_at",
            priority=3,
            flags=["x", "y"],
        ),
        JobSpec(
            "kept",
            {"n": 5},
            run_at=T0 + timedelta(hours=1),
            job_key="p",
            job_key_mode="preserve_run_at",
        ),
    ]
    with psycopg.connect(db_url) as conn, conn.transaction():
        jobs = add_job_specs_on(conn, Queries("graphile_worker"), specs)
        # Nothing is visible outside the caller's transaction until it commits.
        assert rows(db) == []
    assert [job.payload["n"] for job in jobs] == [0, 1, 2, 3, 4, 5]
    assert [job.task_identifier for job in jobs] == [s.identifier for s in specs]
    assert jobs[1].id == jobs[3].id and jobs[4].id == jobs[5].id
    assert jobs[5].run_at == T0
    # Unkeyed specs go in first, in one add_jobs statement; keyed ones follow.
    assert rows(db) == [
        ("brand_new_task", None, T0, {"n": 0}, None, 0),
        ("plain", None, T0 + timedelta(minutes=1), {"n": 2}, {"f": True}, 0),
        ("keyed", "k", T0 + timedelta(minutes=2), {"n": 3}, {"g": True}, 0),
        ("kept", "p", T0, {"n": 5}, None, 0),
    ]


def test_a_bad_spec_is_refused_before_anything_is_written(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    specs: list[Any] = [JobSpec("fine", run_at=T0), {"identifier": "a mapping"}]
    with psycopg.connect(db_url) as conn:
        with pytest.raises(InvalidJobError, match="job spec at index 1 must be a JobSpec"):
            add_job_specs_on(conn, Queries("graphile_worker"), specs)
        conn.commit()
    assert rows(db) == []
