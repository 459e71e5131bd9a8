"""Declared tasks on real PostgreSQL: their defaults reach the job rows, per-call arguments
win, ``defer`` follows the caller's transaction, and a worker runs them from a list."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

import kongtask
from kongtask import ConfigurationError, Runner, WorkerUtils

from .worker_support import jobs, wait_until


class Rollback(Exception):
    """Raised inside a transaction block to roll it back."""


@kongtask.task(queue="reports", priority=5, max_attempts=3, job_key_mode="unsafe_dedupe")
def build_report(payload: Any, helpers: Any) -> None:
    pass


def row(db: psycopg.Connection[Any], job_id: int) -> dict[str, Any]:
    (found,) = [job for job in jobs(db) if job["id"] == job_id]
    return found


def test_add_job_applies_the_declared_defaults(db_url: str, db: psycopg.Connection[Any]) -> None:
    with WorkerUtils(db_url) as utils:
        job = utils.add_job(build_report, {"n": 1})
    stored = row(db, job.id)
    assert (stored["task_identifier"], stored["queue_name"]) == ("build_report", "reports")
    assert (stored["priority"], stored["max_attempts"], stored["payload"]) == (5, 3, {"n": 1})


def test_arguments_given_win_over_the_declaration(db_url: str, db: psycopg.Connection[Any]) -> None:
    with WorkerUtils(db_url) as utils:
        job = utils.add_job(build_report, {"n": 2}, queue_name="urgent", priority=0)
        jobs_added = utils.add_jobs(
            [build_report.spec({"n": 3}, max_attempts=7), {"identifier": build_report}]
        )
    stored = row(db, job.id)
    assert (stored["queue_name"], stored["priority"], stored["max_attempts"]) == ("urgent", 0, 3)
    first, second = (row(db, added.id) for added in jobs_added)
    assert (first["queue_name"], first["priority"], first["max_attempts"]) == ("reports", 5, 7)
    assert (second["queue_name"], second["priority"], second["max_attempts"]) == ("reports", 5, 3)


def test_the_declared_key_mode_applies_to_keyed_jobs(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    with WorkerUtils(db_url) as utils:
        first = utils.add_job(build_report, {"v": 1}, job_key="report:1")
        # unsafe_dedupe: the existing job is kept as it is.
        again = utils.add_job(build_report, {"v": 2}, job_key="report:1")
        # replace, asked for here, wins over the declaration.
        replaced = utils.add_job(build_report, {"v": 3}, job_key="report:1", job_key_mode="replace")
    assert again.id == first.id and again.payload == {"v": 1}
    assert [job["payload"] for job in jobs(db)] == [{"v": 3}]
    assert replaced.payload == {"v": 3}


def test_defer_on_a_rolled_back_transaction_leaves_no_job(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    with psycopg.connect(db_url) as conn:

        def request() -> None:
            with conn.transaction():
                job = build_report.defer({"n": 4}, connection=conn)
                assert job.task_identifier == "build_report"
                # Not visible to anyone else while the transaction is open.
                assert jobs(db) == []
                raise Rollback

        with pytest.raises(Rollback):
            request()
        assert jobs(db) == []
        with conn.transaction():
            job = build_report.defer({"n": 5}, connection=conn, priority=1)
    stored = row(db, job.id)
    assert (stored["queue_name"], stored["priority"], stored["payload"]) == ("reports", 1, {"n": 5})


def test_defer_without_a_connection_uses_the_default_database(
    db_url: str, db: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", db_url)
    job = build_report.defer({"n": 6})
    assert row(db, job.id)["queue_name"] == "reports"
    with pytest.raises(ConfigurationError, match="not both"), psycopg.connect(db_url) as conn:
        build_report.defer(connection=conn, connection_string=db_url)


def test_defer_async_and_add_job_async(db_url: str, db: psycopg.Connection[Any]) -> None:
    async def scenario() -> list[int]:
        async with await psycopg.AsyncConnection.connect(db_url) as conn:
            try:
                async with conn.transaction():
                    await build_report.defer_async({"n": 7}, connection=conn)
                    raise Rollback
            except Rollback:
                pass
            assert jobs(db) == []
            async with conn.transaction():
                a = await build_report.defer_async({"n": 8}, connection=conn, max_attempts=9)
                b = await kongtask.add_job_async(build_report, {"n": 9}, connection=conn)
        c = await build_report.defer_async({"n": 10}, connection_string=db_url)
        return [a.id, b.id, c.id]

    a, b, c = asyncio.run(scenario())
    assert row(db, a)["max_attempts"] == 9
    assert all(row(db, job_id)["queue_name"] == "reports" for job_id in (a, b, c))
    assert all(row(db, job_id)["priority"] == 5 for job_id in (a, b, c))


def test_module_level_add_job_takes_a_declared_task(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    job = kongtask.add_job(build_report, {"n": 11}, connection_string=db_url)
    with psycopg.connect(db_url, autocommit=True) as conn:
        batch = kongtask.add_jobs([build_report.spec({"n": 12})], connection=conn)
    assert [row(db, j.id)["queue_name"] for j in (job, *batch)] == ["reports", "reports"]


def test_a_worker_runs_declared_tasks_from_a_list(db_url: str, db: psycopg.Connection[Any]) -> None:
    done = threading.Event()
    seen: list[tuple[str, Any]] = []

    @kongtask.task(queue="chain", max_attempts=2)
    def first(payload: Any, helpers: Any) -> None:
        seen.append(("first", helpers.job.job_queue_id is not None))
        # helpers.add_job takes a declared task as well.
        helpers.add_job(second, {"from": helpers.job.id})

    @kongtask.task(priority=-3)
    def second(payload: Any, helpers: Any) -> None:
        seen.append(("second", helpers.job.priority))
        done.set()

    runner = Runner(tasks=[first, second], connection_string=db_url, install_signal_handlers=False)
    with runner:
        runner.add_job(first, {})
        assert done.wait(20), f"the declared tasks did not both run: {seen}"
        wait_until(lambda: jobs(db) == [], what="both jobs to complete")
    assert seen == [("first", True), ("second", -3)]


def test_a_worker_refuses_a_declared_task_under_another_name(db_url: str) -> None:
    with pytest.raises(ConfigurationError, match=r"'report'.*'build_report'"):
        Runner(tasks={"report": build_report}, connection_string=db_url)


def test_the_cli_runs_the_declared_tasks_of_a_tasks_file(
    db_url: str, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    (tmp_path / "tasks.py").write_text(
        "import kongtask\n"
        "@kongtask.task(name='reports:build', queue='reports')\n"
        "def build(payload, helpers):\n"
        "    helpers.query('create table built (month text)')\n"
        "    helpers.query('insert into built values (%s)', (payload['month'],))\n"
    )
    with WorkerUtils(db_url) as utils:
        utils.add_job("reports:build", {"month": "2026-11"})
    result = subprocess.run(
        [sys.executable, "-m", "kongtask", "--once", "-c", db_url],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert db.execute("select month from built").fetchall() == [("2026-11",)]
    assert jobs(db) == []
