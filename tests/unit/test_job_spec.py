"""Job arguments are checked before any database work, with the argument named."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kongtask import InvalidJobError, JobSpec
from kongtask.job_spec import encode_payload


def test_defaults_and_json_shape() -> None:
    spec = JobSpec("task", {"a": 1}, flags=["x", "y"], run_at=datetime(2030, 1, 1, tzinfo=UTC))
    assert spec.flags == ("x", "y")
    assert json.loads(spec.json_spec_text()) == {
        "identifier": "task",
        "payload": {"a": 1},
        "run_at": "2030-01-01T00:00:00+00:00",
        "flags": ["x", "y"],
    }
    assert json.loads(JobSpec("task").json_spec_text()) == {"identifier": "task", "payload": {}}
    full = JobSpec(
        't"\\é',
        [1, "two"],
        queue_name="q\n",
        max_attempts=3,
        job_key="k\u2028",
        priority=-5,
    )
    assert json.loads(full.json_spec_text()) == {
        "identifier": 't"\\é',
        "payload": [1, "two"],
        "queue_name": "q\n",
        "max_attempts": 3,
        "job_key": "k\u2028",
        "priority": -5,
    }


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"identifier": ""}, "identifier"),
        ({"identifier": 5}, "identifier"),
        ({"identifier": "x" * 129}, "identifier"),
        ({"identifier": "a\x00b"}, "identifier"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": 1.5}, "max_attempts"),
        ({"priority": 32768}, "priority"),
        ({"priority": -32769}, "priority"),
        ({"job_key_mode": "REPLACE"}, "job_key_mode"),
        ({"flags": [1]}, "flags"),
        ({"flags": [""]}, "flags"),
        ({"run_at": "2030-01-01"}, "run_at"),
        ({"payload": {1, 2}}, "payload"),
        ({"payload": float("inf")}, "payload"),
    ],
)
def test_each_bad_argument_is_named(kwargs: dict[str, Any], field: str) -> None:
    identifier = kwargs.pop("identifier", "task")
    with pytest.raises(InvalidJobError) as info:
        JobSpec(identifier, **kwargs)
    assert info.value.field == field
    assert field in str(info.value)


def test_deeply_nested_payload_is_rejected_cleanly() -> None:
    payload: Any = []
    for _ in range(100_000):
        payload = [payload]
    with pytest.raises(InvalidJobError, match="payload"):
        encode_payload(payload)


def test_coerce_rejects_unknown_fields_and_non_mappings() -> None:
    with pytest.raises(InvalidJobError, match="unknown field"):
        JobSpec.coerce({"identifier": "t", "jobKey": "camel"})
    with pytest.raises(InvalidJobError, match="index 3"):
        JobSpec.coerce(["t"], 3)  # type: ignore[arg-type]


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


@given(
    identifier=st.one_of(st.text(max_size=200), st.integers(), st.none()),
    payload=st.one_of(json_values, st.sets(st.integers()), st.floats()),
    max_attempts=st.one_of(st.none(), st.integers(-5, 40000), st.booleans()),
    priority=st.one_of(st.none(), st.integers(-40000, 40000)),
    job_key=st.one_of(st.none(), st.text(max_size=600)),
    job_key_mode=st.one_of(st.none(), st.text(max_size=20)),
    flags=st.one_of(st.none(), st.lists(st.text(max_size=5)), st.text(max_size=5)),
)
def test_fuzzed_arguments_only_raise_invalid_job_error(**kwargs: Any) -> None:
    error: InvalidJobError | None = None
    try:
        JobSpec(**kwargs)
    except InvalidJobError as exc:
        error = exc
    if error is not None:
        assert error.field in JobSpec.__dataclass_fields__
