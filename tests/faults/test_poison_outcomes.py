"""A job is the unit of failure: one job's outcome never stops the worker or costs its batch.

- Handlers whose exception carries a NUL, lone surrogates, megabytes of text,
  or whose ``__str__`` raises (even ``SystemExit``): each job fails once with a
  sanitised, bounded ``last_error``; the worker goes on.
- Outcomes the database refuses to record (a trigger, a foreign key, a
  constraint of the application's on the job rows), batched with good ones:
  the batch is written job by job, a refused job gets a plain message or is
  permanently failed, nothing is left locked, and the worker goes on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from kongtask import WorkerUtils
from kongtask.jobs.last_error import MAX_LAST_ERROR_CHARS, last_error_text, sanitize_last_error
from kongtask.runner import Runner
from tests.integration.worker_support import jobs, recording

from .ledger import install_ledger

pytestmark = pytest.mark.faults


class _StrRaises(Exception):
    def __str__(self) -> str:
        raise RuntimeError("str of the error exploded")


class _StrExits(Exception):
    def __str__(self) -> str:
        raise SystemExit("str of the error called exit")


class _StrNotText(Exception):
    def __str__(self) -> Any:
        return 42


def _raiser(exc: BaseException) -> Callable[[Any, Any], None]:
    def handler(payload: Any, helpers: Any) -> None:
        raise exc

    return handler


HUGE = "y" * 3_000_000

# task -> (exception raised, the last_error it must leave)
BAD_EXCEPTIONS: dict[str, tuple[BaseException, str]] = {
    "nul": (ValueError("bad\x00byte"), "bad\\x00byte"),
    "nul_only": (ValueError("\x00"), "\\x00"),
    "surrogate": (ValueError("caf\udce9 \ud800!"), "caf\\udce9 \\ud800!"),
    "undecodable": (ValueError(b"\xff\xfe".decode("utf-8", "surrogateescape")), "\\udcff\\udcfe"),
    "bytes": (ValueError(b"\xff\x00"), "b'\\xff\\x00'"),
    "huge": (ValueError(HUGE), ""),  # checked separately
    "str_raises": (_StrRaises("x"), "_StrRaises"),
    "str_exits": (_StrExits("x"), "_StrExits"),
    "str_not_text": (_StrNotText("x"), "_StrNotText"),
    "key_nul": (KeyError("missing\x00key"), "missing\\x00key"),
}


def test_sanitiser_is_bounded_idempotent_and_encodable() -> None:
    for text in ["bad\x00byte", "\ud800" * 20_000, HUGE, "ü" * 20_000, "plain"]:
        once = sanitize_last_error(text)
        assert "\x00" not in once
        once.encode("utf-8")  # always encodable
        assert len(once) <= MAX_LAST_ERROR_CHARS
        assert sanitize_last_error(once) == once
    cut = sanitize_last_error(HUGE)
    assert cut.startswith("y" * 9_000)
    assert cut.endswith(f"… [truncated: {len(HUGE) - (MAX_LAST_ERROR_CHARS - 64)} more characters]")
    assert last_error_text(_StrExits()) == "_StrExits"


def test_bad_exceptions_fail_only_their_job(db_url: str, db: psycopg.Connection[Any]) -> None:
    done: list[int] = []
    lock = threading.Lock()

    def ok(payload: Any, helpers: Any) -> None:
        with lock:
            done.append(payload["n"])

    def batch(payload: Any, helpers: Any) -> list[Any]:
        # A batch job whose failed items carry the same bad messages.
        return [None, ValueError("item\x00one"), _StrExits(), ValueError("\udcff")]

    tasks: dict[str, Any] = {name: _raiser(exc) for name, (exc, _) in BAD_EXCEPTIONS.items()}
    tasks["ok"] = ok
    tasks["batch"] = batch
    with WorkerUtils(db_url) as utils:
        for n, name in enumerate([*BAD_EXCEPTIONS, "batch"]):
            utils.add_job(name, [1, 2, 3, 4] if name == "batch" else {}, queue_name=f"q{n % 3}")
            utils.add_job("ok", {"n": n})
    runner = Runner(
        tasks=tasks, connection_string=db_url, concurrency=4, install_signal_handlers=False
    )
    with recording(runner) as log, runner:
        runner.join(60)
        assert runner.running
        runner.add_job("ok", {"n": 99})  # still working afterwards
        runner.join(30)
    assert log.count("pool:fatalError") == 0
    assert sorted(done) == [*range(len(BAD_EXCEPTIONS) + 1), 99]
    rows = {row["task_identifier"]: row for row in jobs(db)}
    assert set(rows) == {*BAD_EXCEPTIONS, "batch"}
    for name, row in rows.items():
        assert (row["attempts"], row["locked_at"], row["locked_by"]) == (1, None, None), name
        if name == "huge":
            assert row["last_error"] == sanitize_last_error(HUGE)
            assert len(row["last_error"]) == MAX_LAST_ERROR_CHARS - 64 + len(
                f"… [truncated: {len(HUGE) - (MAX_LAST_ERROR_CHARS - 64)} more characters]"
            )
        elif name == "batch":
            assert row["last_error"] == "Batch failures:\nitem\\x00one\n_StrExits\n\\udcff"
            assert row["payload"] == [2, 3, 4]
        else:
            assert row["last_error"] == BAD_EXCEPTIONS[name][1], name
    assert db.execute(
        "select count(*) from graphile_worker._private_job_queues where locked_at is not null"
    ).fetchone() == (0,)


# --- outcomes the database refuses ----------------------------------------------------

# Test-only hostility on the job rows, as an application might add: a trigger
# refusing some updates and a table whose foreign key pins a job row.
_HOSTILE_SCHEMA = """
create function public.refuse_some_updates() returns trigger language plpgsql as $$
begin
  if new.last_error like '%refuse-this-message%' then
    raise exception 'the application refuses that message';
  end if;
  if old.payload::jsonb ? 'pinned_run_at' and new.run_at is distinct from old.run_at then
    raise exception 'the application refuses to move this job';
  end if;
  return new;
end
$$;
create trigger refuse_some_updates before update on graphile_worker._private_jobs
  for each row execute function public.refuse_some_updates();
create table public.job_refs (job_id bigint references graphile_worker._private_jobs (id));
"""


def test_refused_outcomes_are_written_job_by_job(
    db_url: str, db: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    install_ledger(db)  # public.completions: every deleted job row
    db.execute(_HOSTILE_SCHEMA)
    runs: list[int] = []
    gate_started = threading.Event()
    release_gate = threading.Event()
    gate_failing = threading.Event()

    def gate(payload: Any, helpers: Any) -> None:
        runs.append(helpers.job.id)
        gate_started.set()
        assert release_gate.wait(60)
        gate_failing.set()
        raise ValueError("the gate job fails first")

    def fail(payload: Any, helpers: Any) -> None:
        runs.append(helpers.job.id)
        assert gate_failing.wait(60)
        raise ValueError(payload["message"])

    def ok(payload: Any, helpers: Any) -> None:
        runs.append(helpers.job.id)
        assert gate_failing.wait(60)

    tasks = {"gate": gate, "fail": fail, "ok": ok}
    with WorkerUtils(db_url) as utils:
        gate_job = utils.add_job("gate", {}, priority=-1)
        plain = [utils.add_job("fail", {"message": f"plain {n}"}) for n in range(5)]
        refused = utils.add_job("fail", {"message": "refuse-this-message please"}, queue_name="r")
        pinned = utils.add_job("fail", {"message": "x", "pinned_run_at": True}, queue_name="p")
        oks = [utils.add_job("ok", {"n": n}) for n in range(5)]
        referenced = utils.add_job("ok", {"n": 101}, queue_name="f")
    db.execute("insert into public.job_refs values (%s)", (referenced.id,))
    total = 1 + len(plain) + 2 + len(oks) + 1
    runner = Runner(
        tasks=tasks,
        connection_string=db_url,
        concurrency=4,
        local_queue_size=total,
        install_signal_handlers=False,
    )
    caplog.set_level(logging.ERROR, logger="kongtask.jobs.completer")
    with recording(runner) as log, runner:
        assert gate_started.wait(30)
        # Hold the gate job's row so the completer's first statement waits on
        # it while every other outcome piles up: they then go in one batch.
        with psycopg.connect(db_url) as holder:
            holder.execute(
                "select 1 from graphile_worker._private_jobs where id = %s for update",
                (gate_job.id,),
            )
            release_gate.set()
            log.wait_for("job:complete", total, timeout_s=60)
        runner.join(60)
        assert runner.running
        runner.add_job("ok", {"n": 100})
        runner.join(30)
    assert log.count("pool:fatalError") == 0
    rows = {row["id"]: row for row in jobs(db)}
    for row in rows.values():
        assert (row["locked_at"], row["locked_by"]) == (None, None), row
    assert db.execute(
        "select count(*) from graphile_worker._private_job_queues where locked_at is not null"
    ).fetchone() == (0,)
    # Good outcomes batched with the refused ones were recorded as they were.
    assert all(job.id not in rows for job in oks)
    assert rows[gate_job.id]["last_error"] == "the gate job fails first"
    for n, job in enumerate(plain):
        assert (rows[job.id]["attempts"], rows[job.id]["last_error"]) == (1, f"plain {n}")
    # The refused message was replaced by a plain one; the job will be retried.
    row = rows[refused.id]
    assert row["attempts"] == 1 and row["attempts"] < row["max_attempts"]
    assert row["last_error"].startswith(
        "the database refused to record this job's error (P0001: the application refuses "
        "that message)"
    )
    # No failure could be written for the pinned job: permanently failed, unlocked.
    row = rows[pinned.id]
    assert row["attempts"] == row["max_attempts"]
    assert row["last_error"].startswith(
        "the database refused every attempt to record this job's failure (P0001: "
        "the application refuses to move this job)"
    )
    # The referenced job succeeded but cannot be deleted: failed permanently, not rerun.
    row = rows[referenced.id]
    assert row["attempts"] == row["max_attempts"]
    assert row["last_error"].startswith(
        "the job succeeded, but the database refused to delete its row (23503:"
    )
    assert set(rows) == {gate_job.id, refused.id, pinned.id, referenced.id, *(j.id for j in plain)}
    # Each job ran once; each success was completed (deleted) exactly once.
    assert len(runs) == total + 1 and len(set(runs)) == total + 1
    completions = dict(
        db.execute("select job_id, count(*) from public.completions group by job_id").fetchall()
    )
    assert len(completions) == len(oks) + 1 and set(completions.values()) == {1}
    assert {job.id for job in oks} < set(completions)
    messages = [record.getMessage() for record in caplog.records]
    assert any("in one statement was refused" in message for message in messages), messages
