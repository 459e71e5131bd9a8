"""A claim that commits but whose answer is lost with its connection loses no job.

The claim statement locks jobs for the pool and commits; if the connection
breaks before the rows arrive, the retried claim cannot see them (they are
locked) and, without care, they would wait for the 4-hour stale-lock sweep.
The claimer adopts them instead: this test makes the first claim's answer
disappear and requires every job to run promptly, exactly once.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import psycopg
import pytest

from kongtask import Runner, WorkerUtils
from kongtask.actors.claimer import Claimer
from tests.integration.worker_support import wait_until

pytestmark = pytest.mark.faults

JOBS = 40


def test_jobs_of_a_claim_whose_answer_was_lost_are_adopted(
    db_url: str, db: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    original = Claimer._claim
    lost: list[int] = []

    def claim_then_lose_the_answer(self: Claimer, conn: psycopg.Connection[Any], want: int) -> Any:
        jobs = original(self, conn, want)
        if jobs and not lost:
            lost.extend(job.id for job in jobs)
            conn.close()  # the claim committed; its answer never reaches us
            raise psycopg.OperationalError("connection lost after the claim committed")
        return jobs

    monkeypatch.setattr(Claimer, "_claim", claim_then_lose_the_answer)
    with WorkerUtils(db_url) as utils:
        utils.add_jobs([{"identifier": "work", "payload": {"n": n}} for n in range(JOBS)])
        utils.add_jobs(
            [
                {"identifier": "work", "payload": {"n": JOBS + n}, "queue_name": "serial"}
                for n in range(3)
            ]
        )

    runs: dict[int, int] = {}
    lock = threading.Lock()

    def work(payload: dict[str, Any], helpers: Any) -> None:
        with lock:
            runs[payload["n"]] = runs.get(payload["n"], 0) + 1

    caplog.set_level(logging.WARNING, logger="kongtask")
    runner = Runner(
        tasks={"work": work},
        connection_string=db_url,
        concurrency=4,
        poll_interval_s=60.0,  # nothing may wait for a poll, let alone the 4-hour sweep
        install_signal_handlers=False,
    )
    with runner:
        wait_until(
            lambda: len(runs) == JOBS + 3 or not runner.running,
            timeout_s=20,
            what="every job to run, those of the lost claim included",
        )
        runner.join(20)
    assert lost, "the fault was never injected"
    assert runs == dict.fromkeys(range(JOBS + 3), 1)
    left = db.execute("select count(*) from graphile_worker._private_jobs").fetchone()
    assert left == (0,)
    queues = db.execute(
        "select count(*) from graphile_worker._private_job_queues where locked_at is not null"
    ).fetchone()
    assert queues == (0,)
    assert any("Adopted" in record.getMessage() for record in caplog.records)
