"""The fetch policy: every rule of "when to claim" as a row of a table."""

# One case per line reads best.

from __future__ import annotations

import pytest

from kongtask.jobs.fetch_policy import (
    Action,
    Answer,
    BufferLow,
    ClaimAnswered,
    ClaimFailed,
    FetchEvent,
    FetchPolicy,
    Finished,
    InsertNotified,
    PollDue,
    Returned,
    Shutdown,
    Wake,
)

CLAIM, WAIT = Action.CLAIM, Action.WAIT
CAPACITY, LOW = 16, 8


def policy(
    answer: Answer = Answer.NONE,
    *,
    news: bool = False,
    held: int = 0,
    joins: int = 0,
    once: bool = False,
) -> FetchPolicy:
    return FetchPolicy(
        capacity=CAPACITY,
        low_water=LOW,
        once=once,
        answer=answer,
        news=news,
        held=held,
        joins=joins,
    )


# (name, starting state, event, buffer length after the event, expected action)
CASES: list[tuple[str, FetchPolicy, FetchEvent, int, Action]] = [
    # what the claim answered
    ("full claim, buffer above low water", policy(), ClaimAnswered(16, 16), 16, WAIT),
    ("full claim, buffer already at low water", policy(), ClaimAnswered(8, 8), 8, CLAIM),
    ("full claim, buffer drained while it ran", policy(), ClaimAnswered(8, 8), 2, CLAIM),
    ("short claim", policy(), ClaimAnswered(3, 16), 3, WAIT),
    ("short claim, buffer already empty", policy(), ClaimAnswered(3, 16), 0, WAIT),
    ("empty claim", policy(), ClaimAnswered(0, 16), 0, WAIT),
    (
        "full claim plus adopted orphans is still full",
        policy(),
        ClaimAnswered(8, 8, adopted=8),
        8,
        CLAIM,
    ),
    (
        "adopted orphans do not make a short claim full",
        policy(),
        ClaimAnswered(2, 8, adopted=6),
        0,
        WAIT,
    ),
    (
        "one per queue kept fewer, but the candidates filled the batch",
        policy(),
        ClaimAnswered(1, 16, seen=16),
        1,
        CLAIM,
    ),
    (
        "one per queue kept fewer of fewer candidates",
        policy(),
        ClaimAnswered(1, 16, seen=5),
        1,
        WAIT,
    ),
    ("a failed claim waits for the poll", policy(news=True), ClaimFailed(), 0, WAIT),
    # the buffer running low
    ("low after a full claim", policy(Answer.MORE), BufferLow(), 8, CLAIM),
    ("above low water after a full claim", policy(Answer.MORE), BufferLow(), 9, WAIT),
    ("empty after a short claim: nothing new to find", policy(Answer.SHORT), BufferLow(), 0, WAIT),
    (
        "empty after a short claim while a join waits",
        policy(Answer.SHORT, joins=1),
        BufferLow(),
        0,
        CLAIM,
    ),
    (
        "empty after a short claim in run-once mode",
        policy(Answer.SHORT, once=True),
        BufferLow(),
        0,
        CLAIM,
    ),
    (
        "not yet empty after a short claim while a join waits",
        policy(Answer.SHORT, joins=1),
        BufferLow(),
        1,
        WAIT,
    ),
    ("empty after an empty claim", policy(Answer.NONE), BufferLow(), 0, WAIT),
    # news: inserts, polls, wake-ups, released queues
    ("insert after an empty claim", policy(Answer.NONE), InsertNotified(), 0, CLAIM),
    (
        "insert after a short claim, buffer not empty",
        policy(Answer.SHORT),
        InsertNotified(),
        5,
        CLAIM,
    ),
    ("insert with the buffer full", policy(Answer.SHORT), InsertNotified(), 16, WAIT),
    ("insert after a full claim, above low water", policy(Answer.MORE), InsertNotified(), 12, WAIT),
    ("insert after a full claim, at low water", policy(Answer.MORE), InsertNotified(), 8, CLAIM),
    ("poll after an empty claim", policy(Answer.NONE), PollDue(), 0, CLAIM),
    ("wake-up (start, join, sweep)", policy(Answer.NONE), Wake(), 0, CLAIM),
    (
        "a finished batch that released a queue",
        policy(Answer.SHORT, held=3),
        Finished(2, released=True),
        0,
        CLAIM,
    ),
    ("a finished batch, no queue released", policy(Answer.SHORT, held=3), Finished(2), 0, WAIT),
    (
        "the last held job finished while a join waits",
        policy(Answer.NONE, held=2, joins=1),
        Finished(2),
        0,
        CLAIM,
    ),
    (
        "the last held job finished in run-once mode",
        policy(Answer.NONE, held=1, once=True),
        Finished(1),
        0,
        CLAIM,
    ),
    ("the last held job finished, nobody waits", policy(Answer.NONE, held=1), Finished(1), 0, WAIT),
    (
        "some held jobs finished while a join waits",
        policy(Answer.NONE, held=3, joins=1),
        Finished(1),
        0,
        WAIT,
    ),
    (
        "news waiting when the buffer empties",
        policy(Answer.SHORT, news=True),
        BufferLow(),
        0,
        CLAIM,
    ),
    # jobs given back unstarted are not claimed straight back
    ("jobs returned after the TTL", policy(Answer.MORE, held=16), Returned(16), 0, WAIT),
    # back-pressure: outcomes not yet recorded hold the claimer back
    (
        "low buffer, but four times the capacity held",
        policy(Answer.MORE, held=64),
        BufferLow(),
        0,
        WAIT,
    ),
    (
        "a finished batch brings held under the bound",
        policy(Answer.MORE, held=70),
        Finished(7),
        0,
        CLAIM,
    ),
    ("an insert while at the bound", policy(Answer.NONE, held=64), InsertNotified(), 0, WAIT),
    # shutdown
    ("shutdown", policy(Answer.MORE), Shutdown(), 0, WAIT),
]


@pytest.mark.parametrize(
    ("start", "event", "buffered", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_step(start: FetchPolicy, event: FetchEvent, buffered: int, expected: Action) -> None:
    assert start.step(event, buffered) is expected


def in_flight(answer: Answer = Answer.NONE, **state: int) -> FetchPolicy:
    started = policy(answer, **state)  # type: ignore[arg-type]
    started.claim_started()
    return started


# (name, events during and after one claim, buffer length, expected action after the last)
SEQUENCES: list[tuple[str, list[FetchEvent], int, Action]] = [
    (
        "an insert during a claim is acted on right after its (short) answer",
        [InsertNotified(), ClaimAnswered(1, 16)],
        1,
        CLAIM,
    ),
    (
        "an insert during a claim is acted on right after its (empty) answer",
        [InsertNotified(), ClaimAnswered(0, 16)],
        0,
        CLAIM,
    ),
    ("a poll during a claim is acted on after it", [PollDue(), ClaimAnswered(0, 16)], 0, CLAIM),
    (
        "a queue released during a claim is acted on after it",
        [Finished(1, released=True), ClaimAnswered(1, 16)],
        1,
        CLAIM,
    ),
    ("nothing during the claim: wait after an empty answer", [ClaimAnswered(0, 16)], 0, WAIT),
    (
        "shutdown during a claim: never again",
        [InsertNotified(), Shutdown(), ClaimAnswered(0, 16), PollDue(), Wake(), BufferLow()],
        0,
        WAIT,
    ),
    ("no second claim while one is in flight", [InsertNotified(), BufferLow(), PollDue()], 0, WAIT),
]


@pytest.mark.parametrize(
    ("events", "buffered", "expected"),
    [case[1:] for case in SEQUENCES],
    ids=[case[0] for case in SEQUENCES],
)
def test_news_during_a_claim(events: list[FetchEvent], buffered: int, expected: Action) -> None:
    state = in_flight(held=1)
    action = None
    for event in events:
        action = state.step(event, buffered)
    assert action is expected


@pytest.mark.parametrize(
    ("start", "expected"),
    [
        (policy(Answer.MORE), LOW),
        (policy(Answer.SHORT), -1),
        (policy(Answer.SHORT, joins=1), 0),
        (policy(Answer.SHORT, news=True), CAPACITY - 1),
        (policy(Answer.NONE), -1),
        (in_flight(Answer.MORE), -1),
    ],
    ids=[
        "full: low water",
        "short: never",
        "short, join waits: empty",
        "news: any room",
        "empty: never",
        "in flight: never",
    ],
)
def test_wake_level(start: FetchPolicy, expected: int) -> None:
    assert start.wake_level() == expected


def test_held_and_idle() -> None:
    state = policy()
    state.claim_started()
    state.step(ClaimAnswered(5, 16, adopted=2), 7)
    assert (state.held, state.idle) == (7, False)
    state.step(Finished(4), 0)
    state.step(Returned(3), 0)
    state.claim_started()
    state.step(ClaimAnswered(0, 16), 0)
    assert (state.held, state.idle) == (0, True)


def test_a_claim_while_one_is_held_is_not_idle() -> None:
    state = policy(held=1)
    state.claim_started()
    state.step(ClaimAnswered(0, 16), 0)
    assert state.idle is False


@pytest.mark.parametrize(
    ("claim_s", "since_last_s", "expected"),
    [
        (0.015, None, False),  # an ordinary claim
        (0.25, None, True),  # a claim sorting the whole backlog, never analyzed
        (0.25, 5.0, False),  # analyzed five seconds ago
        (0.25, 11.0, True),  # analyzed over ten seconds ago
        (0.1, None, True),  # the threshold itself
    ],
)
def test_wants_analyze(claim_s: float, since_last_s: float | None, expected: bool) -> None:
    from kongtask.jobs.claimer import wants_analyze

    assert wants_analyze(claim_s, since_last_s) is expected
