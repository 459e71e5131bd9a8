"""The one back-off: growth, cap, jitter bounds, and no overflow however long the outage."""

from __future__ import annotations

import random

import pytest

from kongtask.runtime.backoff import backoff_s


class _Fixed(random.Random):
    def __init__(self, value: float) -> None:
        super().__init__()
        self._value = value

    def random(self) -> float:
        return self._value


@pytest.mark.parametrize(
    ("attempt", "jitter", "expected"),
    [
        (0, 0.5, 0.2),  # base, middle of the jitter
        (1, 0.5, 0.4),
        (3, 0.5, 1.6),
        (10, 0.5, 30.0),  # capped
        (0, 0.0, 0.1),  # lowest jitter: half
        (10, 0.999999, 30.0 * 1.499999),  # highest jitter: just under 1.5x the cap
        (-3, 0.5, 0.2),  # a negative attempt counts as the first
        (100_000, 0.5, 30.0),  # growth past float range stays at the cap
    ],
)
def test_backoff_table(attempt: int, jitter: float, expected: float) -> None:
    delay = backoff_s(attempt, base_s=0.2, factor=2.0, cap_s=30.0, rng=_Fixed(jitter))
    assert delay == pytest.approx(expected)


def test_exponential_base_e_never_overflows() -> None:
    # The LISTEN reconnect loop counts attempts for as long as the database is away.
    assert backoff_s(10_000, base_s=0.05, factor=2.718281828, cap_s=60.0) <= 90.0
