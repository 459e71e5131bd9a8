"""Scenario 7: bad input gets a clear error or fails one job, and nothing else changes.

- The crontab parser, fuzzed: only ``CrontabError`` ever escapes, and whatever
  parses renders back to a line that parses to an equal item.
- ``WorkerUtils.add_job``, fuzzed against a real database: only
  ``KongtaskError`` subclasses escape, and a rejected call writes nothing.
- Hostile schema names and task identifiers work (quoted) or are refused,
  and a canary table proves nothing reached SQL unquoted.
- Huge, deeply nested and non-JSON payloads.
- Handlers that raise ``BaseException`` subclasses, hang, return garbage, or
  are coroutine functions.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from psycopg import sql

from kongtask import (
    ConfigurationError,
    CrontabError,
    InvalidJobError,
    KongtaskError,
    WorkerUtils,
    parse_crontab,
    task,
)
from kongtask.cron import render_cron_item
from kongtask.runner import Runner, run_once
from tests.integration.worker_support import recording

from .ledger import wait_until

pytestmark = pytest.mark.faults

CANARY = "canary_do_not_drop"

# --- the crontab parser ---------------------------------------------------------------

_FIELD_TOKENS = st.one_of(
    st.just("*"),
    st.integers(-2, 70).map(str),
    st.tuples(st.integers(0, 70), st.integers(0, 70)).map(lambda t: f"{t[0]}-{t[1]}"),
    st.integers(0, 70).map(lambda n: f"*/{n}"),
    st.tuples(st.integers(0, 30), st.integers(0, 30), st.integers(0, 9)).map(
        lambda t: f"{t[0]}-{t[1]}/{t[2]}"
    ),
    st.text(alphabet="*/-,0123456789xX ", min_size=1, max_size=6),
)
_FIELD = st.lists(_FIELD_TOKENS, min_size=1, max_size=3).map(",".join)
_IDENT = st.one_of(
    st.from_regex(r"[_a-zA-Z][_a-zA-Z0-9:/-]{0,20}", fullmatch=True),
    st.text(min_size=1, max_size=8),
)
_OPTION = st.tuples(
    st.sampled_from(["id", "fill", "max", "queue", "jobKey", "jobKeyMode", "priority", "tz", "x"]),
    st.one_of(
        st.from_regex(r"[a-zA-Z0-9_:-]{1,10}", fullmatch=True),
        st.from_regex(r"[0-9]{1,3}[smhdw]", fullmatch=True),
        st.sampled_from(["replace", "preserve_run_at", "Europe/Paris", "-5", "99999", "%zz"]),
        st.text(max_size=6),
    ),
)
_OPTIONS = st.lists(_OPTION, max_size=3).map(
    lambda pairs: ("?" + "&".join(f"{k}={v}" for k, v in pairs)) if pairs else ""
)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)
_PAYLOAD = st.one_of(
    st.just(""),
    st.dictionaries(st.text(max_size=6), _JSON, max_size=3).map(json.dumps),
    st.text(max_size=12),
)
_NICKNAMES = st.sampled_from(["@hourly", "@daily", "@weekly", "@monthly", "@yearly", "@bogus"])


_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


@st.composite
def _valid_field(draw: st.DrawFn, low: int, high: int) -> str:
    number = st.integers(low, high)
    kind = draw(st.sampled_from(["*", "n", "range", "step", "list"]))
    if kind == "*":
        return "*"
    if kind == "n":
        return str(draw(number))
    if kind == "range":
        a, b = sorted((draw(number), draw(number)))
        return f"{a}-{b}"
    if kind == "step":
        return f"*/{draw(st.integers(1, high))}"
    return ",".join(str(n) for n in draw(st.lists(number, min_size=1, max_size=4)))


_VALID_OPTION = st.one_of(
    st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True).map(lambda v: f"id={v}"),
    st.from_regex(r"([1-9][0-9]?[smhdw]){1,2}", fullmatch=True).map(lambda v: f"fill={v}"),
    st.integers(1, 30).map(lambda v: f"max={v}"),
    st.from_regex(r"[a-z0-9_:-]{1,8}", fullmatch=True).map(lambda v: f"queue={v}"),
    st.from_regex(r"[a-z0-9 ._-]{1,8}", fullmatch=True).map(lambda v: f"jobKey={v}"),
    st.sampled_from(["jobKeyMode=replace", "jobKeyMode=preserve_run_at"]),
    st.integers(-100, 100).map(lambda v: f"priority={v}"),
)


@st.composite
def _crontab_line(draw: st.DrawFn) -> str:
    """A valid line most of the time, with one part replaced by junk now and then."""
    if draw(st.integers(0, 9)) == 0:
        schedule = draw(_NICKNAMES)
    else:
        schedule = " ".join(draw(_valid_field(low, high)) for low, high in _RANGES)
    options = draw(st.lists(_VALID_OPTION, max_size=3, unique_by=lambda o: o.split("=")[0]))
    parts = [
        schedule,
        draw(st.from_regex(r"[_a-zA-Z][_a-zA-Z0-9:/-]{0,12}", fullmatch=True)),
        ("?" + "&".join(options)) if options else "",
        draw(
            st.one_of(
                st.just(""),
                st.dictionaries(st.text(max_size=6), _JSON, max_size=3).map(
                    lambda d: json.dumps(d, ensure_ascii=False)
                ),
            )
        ),
    ]
    spoil = draw(st.integers(0, 5))
    if spoil == 0:
        parts[0] = " ".join(draw(_FIELD) for _ in range(draw(st.sampled_from([5, 4, 6]))))
    elif spoil == 1:
        parts[draw(st.integers(1, 3))] = draw(
            st.one_of(_IDENT, _OPTIONS, _PAYLOAD, st.text(max_size=8))
        )
    return " ".join(part for part in parts if part)


def _parses_or_crontab_error(text: str) -> list[Any]:
    try:
        return parse_crontab(text)
    except CrontabError as error:
        message = str(error)
        assert message, "a CrontabError must say what is wrong"
        return []


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=120))
def test_crontab_parser_fuzz_arbitrary_text(text: str) -> None:
    _parses_or_crontab_error(text)


@settings(max_examples=600, deadline=None)
@given(st.lists(_crontab_line(), min_size=1, max_size=3), st.sampled_from(["\n", "\r\n"]))
def test_crontab_parser_fuzz_grammar_round_trips(lines: list[str], newline: str) -> None:
    items = _parses_or_crontab_error(newline.join(["# fuzz", *lines]))
    event(f"parsed {len(items)} item(s)")
    for item in items:
        try:
            rendered = render_cron_item(item)
        except CrontabError:
            event("not renderable")
            continue  # an item a crontab line cannot express (said clearly)
        (again,) = parse_crontab(rendered)
        assert again == item, (rendered, item)


# --- add_job arguments ----------------------------------------------------------------

_ANY_SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.binary(max_size=4),
)
_TEXTISH = st.one_of(
    st.none(),
    st.text(max_size=12),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=3),
    st.text(min_size=120, max_size=140),
    st.sampled_from(["\x00", "\ud800", "a\udfffb", "'; drop table x; --", '"']),
    st.integers(),
    st.lists(st.text(max_size=3), max_size=2),
)
_VALID = st.from_regex(r"[a-z_][a-z0-9_:-]{0,10}", fullmatch=True)
_PAYLOADS = st.recursive(
    _ANY_SCALAR,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.one_of(st.text(max_size=4), st.integers()), inner, max_size=3)
        | st.sets(st.integers(), max_size=2)
        | st.builds(object)
    ),
    max_leaves=8,
)
_RUN_AT = st.one_of(
    st.none(),
    st.datetimes(timezones=st.just(UTC)),
    st.datetimes(),
    st.text(max_size=8),
    st.integers(),
)


def _counts(conn: psycopg.Connection[Any]) -> tuple[int, ...]:
    row = conn.execute(
        "select (select count(*) from graphile_worker._private_jobs), "
        "(select count(*) from graphile_worker._private_tasks), "
        "(select count(*) from graphile_worker._private_job_queues)"
    ).fetchone()
    assert row is not None
    return tuple(row)


@pytest.fixture
def utils(db_url: str) -> Iterator[WorkerUtils]:
    with WorkerUtils(db_url) as opened:
        yield opened


_HOSTILE_ARGUMENTS = {
    "identifier": _TEXTISH,
    "payload": _PAYLOADS,
    "queue_name": _TEXTISH,
    "run_at": _RUN_AT,
    "max_attempts": st.one_of(st.integers(-5, 40_000), st.text(max_size=2), st.floats()),
    "job_key": _TEXTISH,
    "job_key_mode": st.one_of(_TEXTISH, st.sampled_from(["replace", "unsafe_dedupe"])),
    "priority": st.one_of(st.integers(-40_000, 40_000), st.floats(), st.text(max_size=2)),
    "flags": st.one_of(st.lists(_TEXTISH, max_size=3), st.text(max_size=3), st.integers()),
}


@st.composite
def _add_job_arguments(draw: st.DrawFn) -> dict[str, Any]:
    """Valid arguments with one or two of them replaced by something hostile."""
    arguments: dict[str, Any] = {
        "identifier": draw(_VALID),
        "payload": draw(st.dictionaries(st.text(max_size=4), _JSON, max_size=3)),
        "queue_name": draw(st.one_of(st.none(), _VALID)),
        "job_key": draw(st.one_of(st.none(), _VALID)),
        "priority": draw(st.one_of(st.none(), st.integers(-100, 100))),
        "flags": draw(st.one_of(st.none(), st.lists(_VALID, max_size=2))),
    }
    for name in draw(st.lists(st.sampled_from(sorted(_HOSTILE_ARGUMENTS)), max_size=2)):
        arguments[name] = draw(_HOSTILE_ARGUMENTS[name])
    return arguments


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(arguments=_add_job_arguments())
def test_add_job_fuzz_only_kongtask_errors_and_nothing_written(
    utils: WorkerUtils, db: psycopg.Connection[Any], arguments: dict[str, Any]
) -> None:
    before = _counts(db)
    try:
        job = utils.add_job(**arguments)
    except KongtaskError as error:
        rejected: KongtaskError | None = error
        job = None
    else:
        rejected = None
    if rejected is not None:
        assert str(rejected), "a KongtaskError must say what is wrong"
        assert _counts(db) == before, f"a rejected add_job wrote something: {rejected}"
        event(f"rejected: {getattr(rejected, 'field', None)}")
    else:
        assert job is not None and job.id is not None
        event("accepted")
        db.execute("delete from graphile_worker._private_jobs where id = %s", (job.id,))


# --- hostile names ------------------------------------------------------------------------

HOSTILE = [
    f'x"; drop table public.{CANARY}; --',
    f"x'; drop table public.{CANARY}; --",
    'quote"inside',
    "semi;colon",
    "Ünïcödé_スキーマ",
    "$1",
    "a b\tc",
]


@pytest.fixture
def canary(db: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    db.execute(sql.SQL("create table public.{} (x int)").format(sql.Identifier(CANARY)))
    return db


def _canary_alive(db: psycopg.Connection[Any]) -> bool:
    return db.execute("select to_regclass(%s) is not null", (f"public.{CANARY}",)).fetchone()[0]  # type: ignore[index]


@pytest.mark.parametrize("schema", HOSTILE)
def test_hostile_schema_names_are_quoted(
    schema: str, db_url: str, canary: psycopg.Connection[Any]
) -> None:
    identifier = f"task {schema}"
    with WorkerUtils(db_url, schema=schema) as utils:
        utils.add_job(identifier, {"schema": schema}, queue_name=f"q {schema}", job_key=schema)
    seen: list[Any] = []
    run_once(
        tasks={identifier: lambda payload, helpers: seen.append(payload)},
        connection_string=db_url,
        schema=schema,
        install_signal_handlers=False,
    )
    assert seen == [{"schema": schema}]
    assert _canary_alive(canary)
    exists = canary.execute(
        "select count(*) from pg_namespace where nspname = %s", (schema,)
    ).fetchone()
    assert exists == (1,)
    left = canary.execute(
        sql.SQL("select count(*) from {}._private_jobs").format(sql.Identifier(schema))
    ).fetchone()
    assert left == (0,)


@pytest.mark.parametrize("schema", ["", "x" * 64, "a\x00b", 42])
def test_impossible_schema_names_are_refused(
    schema: Any, db_url: str, canary: psycopg.Connection[Any]
) -> None:
    with pytest.raises(ConfigurationError) as raised:
        WorkerUtils(db_url, schema=schema).open()
    assert raised.value.name == "schema"
    with pytest.raises(ConfigurationError):
        Runner(tasks={}, connection_string=db_url, schema=schema)
    assert _canary_alive(canary)


@pytest.mark.parametrize("identifier", [*HOSTILE, "ünï/cödé:task", "x" * 128, "%s", "{s}"])
def test_hostile_task_identifiers_run(
    identifier: str, db_url: str, canary: psycopg.Connection[Any]
) -> None:
    seen: list[str] = []
    with WorkerUtils(db_url) as utils:
        utils.add_job(identifier, {"id": identifier}, queue_name=identifier[:128])
        utils.add_job("other", {})
    run_once(
        tasks={
            identifier: lambda payload, helpers: seen.append(payload["id"]),
            "other": lambda payload, helpers: None,
        },
        connection_string=db_url,
        install_signal_handlers=False,
    )
    assert seen == [identifier]
    assert _canary_alive(canary)
    assert canary.execute("select count(*) from graphile_worker._private_jobs").fetchone() == (0,)


@pytest.mark.parametrize("identifier", ["", "x" * 129, "a\x00b", "\ud800", 7, None])
def test_impossible_task_identifiers_are_refused(
    identifier: Any, db_url: str, canary: psycopg.Connection[Any]
) -> None:
    before = _counts(canary)
    with WorkerUtils(db_url) as utils, pytest.raises(InvalidJobError) as raised:
        utils.add_job(identifier, {})
    assert raised.value.field == "identifier"
    assert _counts(canary) == before
    if isinstance(identifier, str) and identifier:
        with pytest.raises(ConfigurationError):
            Runner(tasks={identifier: lambda p, h: None}, connection_string=db_url)
    assert _canary_alive(canary)


# --- payloads ---------------------------------------------------------------------------


def _nested(depth: int) -> Any:
    value: Any = {"leaf": True}
    for _ in range(depth):
        value = {"a": [value]}
    return value


def test_huge_and_deep_payloads_round_trip(db_url: str, db: psycopg.Connection[Any]) -> None:
    huge = {"blob": "x" * 10_000_000, "unicode": "ü" * 1000}
    deep = _nested(200)
    seen: dict[str, Any] = {}
    with WorkerUtils(db_url) as utils:
        utils.add_job("huge", huge)
        utils.add_job("deep", deep)
    run_once(
        tasks={
            "huge": lambda payload, helpers: seen.__setitem__("huge", payload),
            "deep": lambda payload, helpers: seen.__setitem__("deep", payload),
        },
        connection_string=db_url,
        install_signal_handlers=False,
    )
    assert seen["huge"] == huge
    assert seen["deep"] == deep
    assert _counts(db)[0] == 0


@pytest.mark.parametrize(
    "payload",
    [
        _nested(100_000),
        {"nan": float("nan")},
        float("inf"),
        {1, 2},
        b"bytes",
        object(),
        {"when": datetime.now(UTC)},
    ],
    ids=["too-deep", "nan", "inf", "set", "bytes", "object", "datetime"],
)
def test_non_json_payloads_are_refused(
    payload: Any, db_url: str, db: psycopg.Connection[Any]
) -> None:
    before = _counts(db)
    with WorkerUtils(db_url) as utils, pytest.raises(InvalidJobError) as raised:
        utils.add_job("t", payload)
    assert raised.value.field == "payload"
    assert "JSON" in str(raised.value)
    assert _counts(db) == before


# --- handlers that misbehave --------------------------------------------------------------


class _Custom(BaseException):
    """A BaseException subclass a library might raise."""


def _raiser(exc: BaseException) -> Any:
    def handler(payload: Any, helpers: Any) -> None:
        raise exc

    return handler


def test_handlers_raising_base_exceptions_fail_only_their_job(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    bad: dict[str, BaseException] = {
        "keyboard": KeyboardInterrupt("ctrl-c inside a handler"),
        "exit": SystemExit("exit inside a handler"),
        "generator": GeneratorExit("generator exit"),
        "custom": _Custom("custom base exception"),
        "memory": MemoryError("pretend out of memory"),
        "recursion": RecursionError("too deep"),
    }
    good: list[int] = []
    lock = threading.Lock()

    def ok(payload: Any, helpers: Any) -> None:
        with lock:
            good.append(payload["n"])

    tasks: dict[str, Any] = {name: _raiser(exc) for name, exc in bad.items()}
    tasks["ok"] = ok
    runner = Runner(
        tasks=tasks, connection_string=db_url, concurrency=3, install_signal_handlers=False
    )
    with WorkerUtils(db_url) as utils:
        for n in range(30):
            utils.add_job("ok", {"n": n})
            if n < len(bad):
                utils.add_job(list(bad)[n], {})
    with recording(runner) as log, runner:
        runner.join(30)
        assert runner.running
        assert runner.probe()["executors"] == {"ok": True}
        # Still working after all of them: a new job runs.
        runner.add_job("ok", {"n": 99})
        runner.join(30)
    assert sorted(good) == [*range(30), 99]
    assert log.count("pool:fatalError") == 0
    rows = db.execute(
        "select task_identifier, attempts, last_error, locked_at from graphile_worker.jobs"
    ).fetchall()
    assert {row[0] for row in rows} == set(bad)
    for name, attempts, last_error, locked_at in rows:
        assert (attempts, locked_at) == (1, None)
        assert last_error == str(bad[name]), (name, last_error)


def test_hanging_handler_is_failed_back_at_the_abort_timeout(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    release = threading.Event()
    started = threading.Event()
    done: list[int] = []

    def hang(payload: Any, helpers: Any) -> None:
        started.set()
        release.wait(120)  # ignores its abort event, as a stuck handler would

    runner = Runner(
        tasks={"hang": hang, "ok": lambda payload, helpers: done.append(payload["n"])},
        connection_string=db_url,
        concurrency=2,
        graceful_shutdown_abort_timeout_s=0.5,
        install_signal_handlers=False,
    )
    try:
        with runner:
            runner.add_job("hang", {}, queue_name="stuck")
            assert started.wait(30)
            for n in range(20):
                runner.add_job("ok", {"n": n})
            # join() would wait for the hanging job too; wait for the others.
            wait_until(lambda: len(done) == 20, timeout_s=30, what="the other jobs")
            stopping = time.monotonic()
        stopped_after = time.monotonic() - stopping
        assert not runner.running
        assert stopped_after < 10, stopped_after
    finally:
        release.set()
    assert sorted(done) == list(range(20))
    row = db.execute(
        "select attempts, locked_at, last_error from graphile_worker.jobs where "
        "task_identifier = 'hang'"
    ).fetchone()
    assert row is not None and row[:2] == (1, None) and "shutting down" in row[2]
    assert db.execute(
        "select count(*) from graphile_worker._private_job_queues where locked_at is not null"
    ).fetchone() == (0,)


class _Weird:
    def __repr__(self) -> str:
        raise RuntimeError("repr exploded")

    def __str__(self) -> str:
        raise RuntimeError("str exploded")


class _BadMessage(Exception):
    def __str__(self) -> str:
        raise RuntimeError("str of the error exploded")


def _gen_result(payload: Any, helpers: Any) -> Any:
    return (x for x in range(3))


def test_handlers_returning_garbage(db_url: str, db: psycopg.Connection[Any]) -> None:
    tasks: dict[str, Any] = {
        "object": lambda payload, helpers: _Weird(),
        "generator": _gen_result,
        "short_list": lambda payload, helpers: [1],
        "exceptions": lambda payload, helpers: [ValueError("first"), None, _Weird()],
        "ok": lambda payload, helpers: None,
    }
    with WorkerUtils(db_url) as utils:
        for name in tasks:
            payload: Any = [1, 2, 3] if name in ("short_list", "exceptions") else {}
            utils.add_job(name, payload)
    runner = Runner(
        tasks=tasks, connection_string=db_url, concurrency=2, install_signal_handlers=False
    )
    with recording(runner) as log, runner:
        runner.join(30)
        assert runner.running
    assert log.count("pool:fatalError") == 0
    rows = {
        row[0]: row[1:]
        for row in db.execute(
            "select t.identifier, j.attempts, j.locked_at, j.payload::text "
            "from graphile_worker._private_jobs j join graphile_worker._private_tasks t "
            "on t.id = j.task_id"
        ).fetchall()
    }
    # A garbage return value is a success (as graphile-worker treats it); a batch
    # keeps only the failed items.
    assert set(rows) == {"exceptions"}
    assert rows["exceptions"][:2] == (1, None)
    assert json.loads(rows["exceptions"][2]) == [1]


def test_exception_whose_str_raises_fails_only_its_job(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    with WorkerUtils(db_url) as utils:
        utils.add_job("bad_message", {})
        utils.add_job("ok", {})
    done: list[int] = []
    runner = Runner(
        tasks={"bad_message": _raiser(_BadMessage()), "ok": lambda p, h: done.append(1)},
        connection_string=db_url,
        install_signal_handlers=False,
    )

    def failed_once() -> bool:
        row = db.execute(
            "select count(*) from graphile_worker._private_jobs "
            "where attempts = 1 and locked_at is null"
        ).fetchone()
        return row == (1,)

    with runner:
        wait_until(
            lambda: not runner.running or (len(done) == 1 and failed_once()),
            timeout_s=30,
            what="the bad job to fail and the good one to run",
        )
        assert runner.running


def test_generator_handlers_are_refused_up_front(db_url: str) -> None:
    async def async_generator(payload: Any, helpers: Any) -> Any:
        yield None

    def generator(payload: Any, helpers: Any) -> Any:
        yield None

    for bad in (async_generator, generator, task(name="t")(async_generator)):
        with pytest.raises(ConfigurationError) as raised:
            Runner(tasks={"t": bad}, connection_string=db_url)
        assert raised.value.name == "tasks"
        assert "'t'" in str(raised.value)
