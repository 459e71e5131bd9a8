"""One back-off for every "try again later" in kongtask: grow, cap, jitter.

The delay before retry number ``attempt`` (0-based) is ``base_s * factor **
attempt``, capped at ``cap_s``, times a jitter factor drawn from [0.5, 1.5)
so that many workers that lost the same database do not come back in step.
Growth never overflows: past the cap it stays at the cap however many
attempts have failed (an outage of a day is just many capped waits).
"""

from __future__ import annotations

import random

__all__ = ["backoff_s"]


# Our own generator: kongtask never moves the application's global random state.
_JITTER = random.Random()


def backoff_s(
    attempt: int,
    *,
    base_s: float,
    factor: float,
    cap_s: float,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before retry ``attempt`` (0-based), jittered by 0.5x to 1.5x."""
    try:
        grown = base_s * factor ** max(0, attempt)
    except OverflowError:
        grown = cap_s
    return min(grown, cap_s) * (0.5 + (rng or _JITTER).random())
