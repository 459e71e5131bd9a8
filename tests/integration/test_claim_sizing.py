"""Claim sizing against a real database: a pool of slow jobs leaves work for the others.

The sizing rule and the policy's sized asks are table-tested in
``tests/unit/test_claim_sizing.py``; this test runs two pools (concurrency 4
each) on one schema. Once each has measured its handlers slow (200 ms), a
burst of jobs is added at once: without sizing the first pool to claim takes
a whole buffer (16 jobs, four rounds of its slots) while the other pool's
slots sit idle. With it, every claim asks for about the idle slots and a job
more, both pools run the burst, and no job waits in a buffer much longer
than one round.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest

from kongtask import Runner, WorkerUtils
from kongtask.jobs.claimer import Claimer
from tests.integration.worker_support import wait_until

CONCURRENCY = 4
RUN_S = 0.2
BURST = 24
POLL_S = 60.0  # notices drive every claim here


def test_a_pool_of_slow_jobs_claims_about_its_idle_slots(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    policies: dict[str, Any] = {}
    asks: list[tuple[str, int, bool]] = []  # (pool, asked, measured before the claim)
    original_claim = Claimer._claim

    def claim(self: Claimer, conn: psycopg.Connection[Any], want: int) -> Any:
        sizing = getattr(self.policy, "sizing", None)
        policies[self.ctx.pool_id] = self.policy
        measured = sizing is not None and sizing.average_run_s is not None
        asks.append((self.ctx.pool_id, want, measured))
        return original_claim(self, conn, want)

    monkeypatch.setattr(Claimer, "_claim", claim)
    lock = threading.Lock()
    # job id -> (pool, seconds from its claim to its handler's start)
    started: dict[int, tuple[str, float]] = {}
    all_started = threading.Event()
    pause = threading.Event()

    def slow(payload: dict[str, Any], helpers: Any) -> None:
        job = helpers.job
        waited = time.time() - job.locked_at.timestamp()
        with lock:
            started[job.id] = (job.locked_by, waited)
            if len(started) >= BURST:
                all_started.set()
        pause.wait(RUN_S)

    warmed: list[int] = []

    def warm(payload: dict[str, Any], helpers: Any) -> None:
        pause.wait(RUN_S)
        with lock:
            warmed.append(helpers.job.id)

    def runner(warm_task: str) -> Runner:
        # Each pool has a warm-up task of its own, so that both measure their handlers.
        return Runner(
            tasks={"slow": slow, warm_task: warm},
            connection_string=db_url,
            concurrency=CONCURRENCY,
            poll_interval_s=POLL_S,
            install_signal_handlers=False,
        )

    first, second = runner("warm_a"), runner("warm_b")
    with first, second, WorkerUtils(db_url) as utils:
        utils.add_jobs(
            [{"identifier": "warm_a"}] * CONCURRENCY + [{"identifier": "warm_b"}] * CONCURRENCY
        )

        def both_recorded() -> bool:
            # Every warm-up outcome is written and told to its pool's claimer.
            with lock:
                ran = len(warmed)
            held = [policy.held for policy in policies.values()]
            return ran == 2 * CONCURRENCY and held == [0, 0]

        wait_until(both_recorded, what="both pools recorded their warm-up jobs")
        asks.clear()
        utils.add_jobs([{"identifier": "slow", "payload": {"n": n}} for n in range(BURST)])
        assert all_started.wait(30), f"only {len(started)} of {BURST} jobs started"
        first.join(20)
        second.join(20)

    pools = {pool for pool, _ in started.values()}
    assert len(pools) == 2, f"one pool ran the whole burst: {pools}"
    # The idle slots and a job or two more; never a whole buffer (16).
    assert asks and max(asked for _, asked, _ in asks) <= CONCURRENCY + 2, asks
    waits = sorted(waited for _, waited in started.values())
    # Buffered behind one round of running jobs at most (and some scheduling slack).
    assert waits[-1] < RUN_S * 1.75, waits
    assert all(measured for *_, measured in asks), asks
