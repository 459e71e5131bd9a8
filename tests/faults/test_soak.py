"""Scenario 8: the soak, one million jobs through 4 processes x 24 (not part of the default run).

Runs only with ``KONGTASK_SOAK=1``; the job count is ``KONGTASK_SOAK_JOBS``
(default 1,000,000). The same run is ``python tools/soak.py``, which prints
the throughput and memory table for ``docs/reliability.md``.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from tools.soak import run_soak

pytestmark = [
    pytest.mark.soak,
    pytest.mark.skipif(
        os.environ.get("KONGTASK_SOAK") != "1", reason="the soak runs only with KONGTASK_SOAK=1"
    ),
]

# RSS may wobble with the allocator; a leak of a few bytes per job would show
# as tens of megabytes over a million jobs.
MAX_GROWTH_MB = 16.0


@pytest.mark.timeout(4 * 3600)
def test_soak(server_conninfo: str, record_property: Any) -> None:
    jobs = int(os.environ.get("KONGTASK_SOAK_JOBS", "1000000"))
    result = run_soak(server_conninfo, jobs=jobs, processes=4, concurrency=24, fail_rate=0.02)
    print()
    print(result.table())
    print(
        f"{jobs} jobs in {result.run_s:.1f}s: {result.jobs_per_s:.0f} jobs/s overall, "
        f"{result.jobs_per_s_first_98:.0f} jobs/s to 98%; peak RSS "
        f"{[round(v) for v in result.peak_rss_mb]} MB, growth after warm-up "
        f"{[round(v, 1) for v in result.rss_growth_mb]} MB; {result.ledger}"
    )
    record_property("ledger", result.ledger)
    assert result.clean, result.ledger
    assert result.failed_executions > 0  # the random failures really happened
    assert max(result.rss_growth_mb) < MAX_GROWTH_MB, result.rss_growth_mb
