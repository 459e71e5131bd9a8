"""When the worker vacuums the jobs table itself (kongtask.jobs.upkeep.wants_vacuum)."""

from __future__ import annotations

import pytest

from kongtask.jobs.upkeep import MIN_INTERVAL_S, wants_vacuum


@pytest.mark.parametrize(
    ("dead", "live", "threshold", "since_last_s", "expected"),
    [
        # At the threshold, with few live rows: vacuum.
        (50_000, 0, 50_000, None, True),
        (50_000, 250_000, 50_000, None, True),
        # Below the threshold: autovacuum's business.
        (49_999, 0, 50_000, None, False),
        # A large backlog: the dead must also be a fifth of the live.
        (50_000, 250_001, 50_000, None, False),
        (400_000, 1_000_000, 50_000, None, True),
        # Upkeep off.
        (10**9, 0, None, None, False),
        # At most once every MIN_INTERVAL_S (30 s) per pool.
        (100_000, 0, 50_000, MIN_INTERVAL_S - 0.1, False),
        (100_000, 0, 50_000, MIN_INTERVAL_S, True),
    ],
)
def test_wants_vacuum(
    dead: int, live: int, threshold: int | None, since_last_s: float | None, expected: bool
) -> None:
    assert wants_vacuum(dead, live, threshold, since_last_s) is expected
