"""A claim that commits but whose answer is lost with its connection loses no job.

The claim statement locks jobs for the pool and commits; if the connection
breaks before the rows arrive, the retried claim cannot see them (they are
locked) and, without care, they would wait for the 4-hour stale-lock sweep.
The claimer adopts them instead: this test makes one claim's answer disappear
and requires every job to run promptly, exactly once.

The adopted jobs come on top of a full claim. Counted as the claim's own
rows they made it look short, and after a short claim the claimer waits for
news (an insert, a released queue, the poll): with every start-up wake-up
already consumed, it waited for the 60 s poll with jobs still queued. The
test orders things so that no other wake-up can hide that: the lost claim is
the second one, made at the low-water mark after the listener's and the
start's wake-ups were processed.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import psycopg
import pytest

from kongtask import Runner, WorkerUtils
from kongtask.jobs.claimer import Claimer, HeldCount
from kongtask.jobs.listener import Listener
from tests.integration.worker_support import actor_ref, wait_until

pytestmark = pytest.mark.faults

JOBS = 100
CONCURRENCY = 4  # the local queue holds 16, so the second claim asks for 8


def test_jobs_of_a_claim_whose_answer_was_lost_are_adopted(
    db_url: str, db: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    original_claim = Claimer._claim
    armed = threading.Event()
    lost: list[int] = []
    # Handlers pause while the faulty claim and its retry run, so the buffer's
    # level (and so what the claimer does next) is the same every run.
    flowing = threading.Event()
    flowing.set()

    def claim_then_lose_the_answer(self: Claimer, conn: psycopg.Connection[Any], want: int) -> Any:
        if armed.is_set() and not lost:
            flowing.clear()
        answer = original_claim(self, conn, want)
        if lost:
            flowing.set()
        if armed.is_set() and answer[0] and not lost:
            lost.extend(job.id for job in answer[0])
            conn.close()  # the claim committed; its answer never reaches us
            raise psycopg.OperationalError("connection lost after the claim committed")
        return answer

    monkeypatch.setattr(Claimer, "_claim", claim_then_lose_the_answer)

    # Know when the listener has told the claimer it is connected.
    listener_told = threading.Event()
    original_init = Listener.__init__

    def init(self: Listener, ctx: Any, nudge: Any, **kwargs: Any) -> None:
        def told() -> None:
            nudge()
            listener_told.set()

        original_init(self, ctx, told, **kwargs)

    monkeypatch.setattr(Listener, "__init__", init)

    with WorkerUtils(db_url) as utils:
        utils.add_jobs([{"identifier": "work", "payload": {"n": n}} for n in range(JOBS)])
        # Named-queue jobs last (lower priority), so their queue releases
        # cannot wake the claimer before the stall would show.
        utils.add_jobs(
            [
                {
                    "identifier": "work",
                    "payload": {"n": JOBS + n},
                    "queue_name": "serial",
                    "priority": 1,
                }
                for n in range(3)
            ]
        )

    runs: dict[int, int] = {}
    cond = threading.Condition()
    gate = threading.Event()

    def work(payload: dict[str, Any], helpers: Any) -> None:
        with cond:
            runs[payload["n"]] = runs.get(payload["n"], 0) + 1
            cond.notify_all()
        assert gate.wait(30), "the test never opened the gate"
        assert flowing.wait(30), "the claim after the lost answer never came"

    caplog.set_level(logging.WARNING, logger="kongtask")
    runner = Runner(
        tasks={"work": work},
        connection_string=db_url,
        concurrency=CONCURRENCY,
        poll_interval_s=60.0,  # nothing may wait for a poll, let alone the 4-hour sweep
        install_signal_handlers=False,
    )
    with runner:
        with cond:
            assert cond.wait_for(lambda: len(runs) == CONCURRENCY, 20), runs
        assert listener_told.wait(20), "the listener never connected"
        claimer = actor_ref(runner, "claimer")
        claimer.ask(HeldCount(), timeout=20)  # every wake-up sent so far is processed
        armed.set()
        gate.set()
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
