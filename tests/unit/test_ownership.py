"""When a pool doubts that it still holds a buffered job (no database: the rule alone)."""

from __future__ import annotations

from kongtask.jobs.ownership import Ownership


def test_a_fresh_job_of_a_beating_pool_is_not_doubted() -> None:
    ownership = Ownership(heartbeat_interval_s=10, pool_dead_after_s=60)
    assert ownership.bound_s == 35
    assert ownership.doubt(ownership.now()) is None
    assert ownership.doubt(ownership.now() - 30) is None


def test_a_job_waiting_longer_than_the_bound_is_doubted() -> None:
    ownership = Ownership(heartbeat_interval_s=10, pool_dead_after_s=60)
    reason = ownership.doubt(ownership.now() - 40)
    assert reason is not None and reason.startswith("the job was claimed (or last confirmed) 4")


def test_a_late_heartbeat_casts_doubt_on_every_job() -> None:
    ownership = Ownership(heartbeat_interval_s=10, pool_dead_after_s=60)
    ownership.beat(ownership.now() - 36)
    reason = ownership.doubt(ownership.now())
    assert reason is not None and reason.startswith("this pool's last heartbeat went out 3")
    ownership.beat(ownership.now())
    assert ownership.doubt(ownership.now()) is None


def test_jobs_known_before_the_pool_was_declared_dead_are_doubted() -> None:
    ownership = Ownership(heartbeat_interval_s=10, pool_dead_after_s=60)
    found_gone_at = ownership.now()
    ownership.lost(found_gone_at)
    # Registered again at once: the heartbeat is fresh, the older jobs are still in doubt.
    ownership.beat(ownership.now())
    reason = "another pool declared this pool dead and released its jobs"
    assert ownership.doubt(found_gone_at - 1) == reason
    assert ownership.doubt(found_gone_at) == reason
    # Claimed after that: this pool's own, whatever happened before.
    assert ownership.doubt(found_gone_at + 0.001) is None
