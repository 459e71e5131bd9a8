"""Payload text PostgreSQL cannot store is refused the same way on every enqueue path.

A NUL (U+0000) or a lone surrogate in a payload string or key is accepted by
the json type but cannot become text or jsonb: ``add_jobs`` used to raise a raw
``psycopg.errors.UntranslatableCharacter``. Every path now raises
``InvalidJobError`` naming the field (and, for ``add_jobs``, the spec index)
before anything is written.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

import kongtask
from kongtask import InvalidJobError, JobSpec, WorkerUtils
from kongtask.runner import Runner

BAD_PAYLOADS = {
    "nul-value": ({"a": ["ok", "x\x00y"]}, "payload['a'][1] contains a NUL character"),
    "nul-key": ({"k\x00": 1}, "a key of payload contains a NUL character"),
    "surrogate": ({"s": "caf\udce9"}, "payload['s'] contains a lone surrogate (U+DCE9)"),
    "top-level": ("\ud800", "payload contains a lone surrogate (U+D800)"),
}

# Payloads that look alike in JSON but are fine: stored and read back as given.
GOOD_PAYLOADS: list[Any] = [
    {"text": "a literal \\u0000 and \\ud800, not the characters"},
    {"emoji": "\U0001f600", "ü": "ß"},
]


def _counts(db: psycopg.Connection[Any]) -> tuple[Any, ...]:
    row = db.execute(
        "select (select count(*) from graphile_worker._private_jobs), "
        # Only the task the bad payloads name: a Runner records its own tasks
        # when it first claims.
        "(select count(*) from graphile_worker._private_tasks where identifier = 't')"
    ).fetchone()
    assert row is not None
    return tuple(row)


def _check(raised: pytest.ExceptionInfo[InvalidJobError], expected: str, index: int | None) -> None:
    assert raised.value.field == "payload"
    assert expected in str(raised.value)
    if index is not None:
        assert str(raised.value).startswith(f"job spec at index {index}: ")


@pytest.mark.parametrize("case", sorted(BAD_PAYLOADS))
def test_worker_utils_paths_refuse_and_write_nothing(
    case: str, db_url: str, db: psycopg.Connection[Any]
) -> None:
    payload, expected = BAD_PAYLOADS[case]
    before = _counts(db)
    with WorkerUtils(db_url) as utils:
        with pytest.raises(InvalidJobError) as raised:
            utils.add_job("t", payload)
        _check(raised, expected, None)
        with pytest.raises(InvalidJobError) as raised:
            utils.add_jobs(
                [{"identifier": "t", "payload": {}}, {"identifier": "t", "payload": payload}]
            )
        _check(raised, expected, 1)
        with pytest.raises(InvalidJobError) as raised:
            utils.add_jobs([JobSpec("t", payload)])
        _check(raised, expected, None)
    with pytest.raises(InvalidJobError) as raised:
        kongtask.add_job("t", payload, connection_string=db_url)
    _check(raised, expected, None)
    assert _counts(db) == before


def test_runner_and_helpers_paths_refuse(db_url: str, db: psycopg.Connection[Any]) -> None:
    seen: list[tuple[str, BaseException | None]] = []
    done = threading.Event()

    def attempt(name: str, call: Callable[[], Any]) -> None:
        try:
            call()
        except Exception as exc:
            seen.append((name, exc))
        else:
            seen.append((name, None))

    def enqueue_bad(payload: Any, helpers: Any) -> None:
        for case, (bad, _) in sorted(BAD_PAYLOADS.items()):
            attempt(f"helpers.add_job {case}", lambda bad=bad: helpers.add_job("t", bad))
            attempt(
                f"helpers.add_jobs {case}",
                lambda bad=bad: helpers.add_jobs([{"identifier": "t", "payload": bad}]),
            )
        done.set()

    runner = Runner(
        tasks={"enqueue_bad": enqueue_bad}, connection_string=db_url, install_signal_handlers=False
    )
    with runner:
        before = _counts(db)
        for case, (bad, _) in sorted(BAD_PAYLOADS.items()):
            attempt(f"Runner.add_job {case}", lambda bad=bad: runner.add_job("t", bad))
            attempt(
                f"Runner.add_jobs {case}",
                lambda bad=bad: runner.add_jobs(
                    [{"identifier": "t"}, {"identifier": "t", "payload": bad}]
                ),
            )
        assert _counts(db) == before
        runner.add_job("enqueue_bad", {})
        assert done.wait(30)
        runner.join(30)
    assert len(seen) == 4 * len(BAD_PAYLOADS)
    for name, error in seen:
        assert isinstance(error, InvalidJobError), (name, error)
        assert error.field == "payload", name
        case = name.split()[-1]
        assert BAD_PAYLOADS[case][1] in str(error), (name, error)
        if name.startswith("Runner.add_jobs"):
            assert str(error).startswith("job spec at index 1: "), name
        elif name.startswith("helpers.add_jobs"):
            assert str(error).startswith("job spec at index 0: "), name
    # Only the enqueue_bad job ever existed, and it succeeded.
    assert _counts(db)[0] == 0


@pytest.mark.parametrize("payload", GOOD_PAYLOADS, ids=["escaped-text", "non-bmp"])
def test_look_alike_payloads_are_stored_as_given(payload: Any, db_url: str) -> None:
    with WorkerUtils(db_url) as utils:
        assert utils.add_job("t", payload).payload == payload
        (job,) = utils.add_jobs([{"identifier": "t", "payload": payload}])
        assert job.payload == payload
