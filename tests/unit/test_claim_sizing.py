"""Claim sizing: the buffer target, the moving averages, and the policy's sized asks."""

# One case per line reads best.

from __future__ import annotations

import pytest

from kongtask.jobs.claim_sizing import (
    LEAD_MARGIN_S,
    ClaimSizing,
    buffer_floor,
    buffer_target,
)
from kongtask.jobs.fetch_policy import (
    Action,
    Answer,
    BufferLow,
    ClaimAnswered,
    FetchPolicy,
    Finished,
    InsertNotified,
)

CLAIM, WAIT = Action.CLAIM, Action.WAIT


# (name, concurrency, capacity, average run time, lead time, expected target)
TARGETS: list[tuple[str, int, int, float | None, float, int]] = [
    ("not measured yet: the floor", 16, 64, None, 0.01, 4),
    ("100 ms jobs need only the floor", 16, 64, 0.1, 0.012, 4),
    ("10 ms jobs: the lead time's worth", 16, 64, 0.010, 0.012, 20),
    ("5 ms jobs round up", 16, 64, 0.005, 0.012, 39),
    ("2 ms jobs fill the buffer", 16, 64, 0.002, 0.012, 64),
    ("no-op jobs fill the buffer", 24, 500, 0.00001, 0.012, 500),
    ("a zero run time fills the buffer", 4, 16, 0.0, 0.012, 16),
    ("concurrency 4: floor of one", 4, 16, 0.2, 0.012, 1),
    ("concurrency 1: floor of one", 1, 16, 600.0, 0.012, 1),
    ("concurrency 64: floor of four", 64, 256, 10.0, 0.012, 4),
    ("floor never above the capacity", 16, 2, 1.0, 0.012, 2),
    ("a slow database widens the lead", 16, 64, 0.1, 0.200, 32),
]


@pytest.mark.parametrize(
    ("concurrency", "capacity", "average_run_s", "lead_s", "expected"),
    [case[1:] for case in TARGETS],
    ids=[case[0] for case in TARGETS],
)
def test_buffer_target(
    concurrency: int, capacity: int, average_run_s: float | None, lead_s: float, expected: int
) -> None:
    assert buffer_target(concurrency, capacity, average_run_s, lead_s) == expected


@pytest.mark.parametrize(
    ("concurrency", "capacity", "expected"),
    [(1, 16, 1), (4, 16, 1), (8, 32, 2), (16, 64, 4), (100, 400, 4), (16, 3, 3)],
)
def test_buffer_floor(concurrency: int, capacity: int, expected: int) -> None:
    assert buffer_floor(concurrency, capacity) == expected


def test_averages_start_with_the_first_measure_and_move_towards_new_ones() -> None:
    sizing = ClaimSizing(concurrency=16, capacity=64)
    assert sizing.target() == 4  # cold: the floor, until a run time is known
    assert sizing.lead_s == pytest.approx(LEAD_MARGIN_S)
    sizing.note_runs(0.0, 0)  # no handler ran: nothing learnt
    assert sizing.average_run_s is None
    sizing.note_runs(0.4, 4)
    assert sizing.average_run_s == pytest.approx(0.1)
    sizing.note_claim(0.001)
    assert sizing.lead_s == pytest.approx(0.002 + LEAD_MARGIN_S)
    assert sizing.target() == 4
    # One fast run moves the average a fifth of the way; many move it most of the way.
    sizing.note_runs(0.0, 1)
    assert sizing.average_run_s == pytest.approx(0.08)
    sizing.note_runs(0.0, 50)
    assert sizing.average_run_s == pytest.approx(0.08 * 0.8**50)
    assert sizing.target() == 64
    sizing.note_claim(0.011)
    assert sizing.average_claim_s == pytest.approx(0.003)


def sized(
    average_run_s: float | None,
    *,
    held: int = 0,
    answer: Answer = Answer.MORE,
    news: bool = False,
) -> FetchPolicy:
    """A policy of 16 slots and a 64-job buffer whose handlers took ``average_run_s``."""
    sizing = ClaimSizing(
        concurrency=16, capacity=64, average_run_s=average_run_s, average_claim_s=0.001
    )
    return FetchPolicy(
        capacity=64, low_water=32, sizing=sizing, held=held, answer=answer, news=news
    )


# (name, policy, buffered, expected ask)
ASKS: list[tuple[str, FetchPolicy, int, int]] = [
    ("unsized: the buffer's room", FetchPolicy(capacity=64, low_water=32), 10, 54),
    ("fast jobs: the buffer's room", sized(0.0001, held=40), 10, 54),
    ("slow jobs, all slots idle: the slots and the floor", sized(0.1), 0, 20),
    ("slow jobs, all slots busy: the floor less the buffered", sized(0.1, held=17), 1, 3),
    ("slow jobs, half the slots busy", sized(0.1, held=8), 0, 12),
    ("slow jobs, outcomes unwritten count as running", sized(0.1, held=30), 0, 4),
    ("slow jobs, buffer at the target: nothing", sized(0.1, held=20), 4, 0),
    ("cold, all slots idle: the slots and the floor", sized(None), 0, 20),
    ("cold, all slots busy: the floor less the buffered", sized(None, held=30), 3, 1),
    (
        "never more than the room",
        FetchPolicy(capacity=8, low_water=4, sizing=ClaimSizing(16, 8)),
        0,
        8,
    ),
]


@pytest.mark.parametrize(
    ("start", "buffered", "expected"), [case[1:] for case in ASKS], ids=[case[0] for case in ASKS]
)
def test_ask(start: FetchPolicy, buffered: int, expected: int) -> None:
    assert start.ask(buffered) == expected


# (name, policy, event, buffered after it, expected action, expected wake level)
STEPS: list[tuple[str, FetchPolicy, object, int, Action, int]] = [
    ("slow, full claim, buffer at the target", sized(0.1), ClaimAnswered(20, 20), 4, WAIT, 2),
    ("slow, full claim, buffer at half the target", sized(0.1), ClaimAnswered(18, 18), 2, CLAIM, 2),
    (
        "fast, full claim, buffer above low water",
        sized(0.0001),
        ClaimAnswered(64, 64),
        40,
        WAIT,
        32,
    ),
    (
        "slow, news with the buffer at the target",
        sized(0.1, answer=Answer.SHORT),
        InsertNotified(),
        4,
        WAIT,
        3,
    ),
    (
        "slow, news with room below the target",
        sized(0.1, answer=Answer.SHORT),
        InsertNotified(),
        3,
        CLAIM,
        3,
    ),
    ("slow, the buffer fell to half the target", sized(0.1, held=20), BufferLow(), 2, CLAIM, 2),
    (
        "slow, a small ask filled is still more",
        sized(0.1, answer=Answer.NONE),
        ClaimAnswered(2, 2),
        1,
        CLAIM,
        2,
    ),
    (
        "slow, a small ask short waits for news",
        sized(0.1, answer=Answer.NONE),
        ClaimAnswered(1, 2),
        1,
        WAIT,
        -1,
    ),
    (
        "slow, news with every slot busy waits for a slot",
        sized(0.1, held=17, answer=Answer.SHORT),
        InsertNotified(),
        1,
        WAIT,
        -1,
    ),
    (
        "slow, the news kept is claimed once a slot is free",
        sized(0.1, held=18, answer=Answer.SHORT, news=True),
        Finished(2, run_s=0.2, timed=2),
        1,
        CLAIM,
        0,
    ),
    (
        "fast, news with every slot busy still claims",
        sized(0.0001, held=17, answer=Answer.SHORT),
        InsertNotified(),
        1,
        CLAIM,
        0,
    ),
    (
        "finished runs that turn out slow shrink the target",
        sized(None, held=40),
        Finished(16, run_s=1.6, timed=16),
        8,
        WAIT,
        2,
    ),
]


@pytest.mark.parametrize(
    ("start", "event", "buffered", "expected", "level"),
    [case[1:] for case in STEPS],
    ids=[case[0] for case in STEPS],
)
def test_sized_step(
    start: FetchPolicy, event: object, buffered: int, expected: Action, level: int
) -> None:
    assert start.step(event, buffered) is expected  # type: ignore[arg-type]
    if expected is WAIT:
        assert start.wake_level(buffered) == level


def test_claim_round_trips_feed_the_lead_time() -> None:
    start = sized(0.01)
    assert start.sizing is not None
    start.step(ClaimAnswered(20, 20, took_s=0.009), 20)
    assert start.sizing.average_claim_s == pytest.approx(0.001 + 0.2 * 0.008)
    start.step(ClaimAnswered(20, 20), 20)  # a retried claim's time is not a round trip
    assert start.sizing.average_claim_s == pytest.approx(0.0026)
