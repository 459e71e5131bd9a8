"""The ledger: an independent record of what ran, and the check every scenario ends with.

Handlers (``work`` in :data:`TASKS_SOURCE`, written to a file and loaded by real
``kongtask`` processes) append ``(job id, n, attempt, pid, pool id, phase)`` to a
``ledger`` table in the same database. A statement-level trigger on
``_private_jobs`` appends every deleted job row to ``completions``: that is the
queue's own bookkeeping of "completed", seen from the database rather than from
logs. :func:`check_ledger` then compares the enqueued jobs (numbered by their
payload's ``n``) against both tables.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from tests.conftest import to_uri

__all__ = [
    "SCRIPT_SOURCE",
    "TASKS_SOURCE",
    "LedgerReport",
    "WorkerProcess",
    "check_ledger",
    "enqueue",
    "install_ledger",
    "make_specs",
    "wait_until",
    "write_tasks",
]

SCHEMA = "graphile_worker"

# The task file the worker processes load (``--tasks FILE``). It reads the
# ledger's location from the environment at call time, so the same file works
# in a CLI subprocess and in-process.
TASKS_SOURCE = '''\
"""Ledger tasks for kongtask's fault scenarios."""

import os
import random
import threading

import psycopg

_local = threading.local()
_opened = []
_INSERT = (
    "insert into public.ledger (job_id, n, attempt, pid, pool_id, phase) "
    "values (%s, %s, %s, %s, %s, %s)"
)


def _own_connection():
    # Each executor thread writes over a connection of its own, named so that
    # fault injection (which targets the pool's sessions) leaves it alone.
    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed or conn.broken:
        conn = psycopg.connect(
            os.environ["KONGTASK_LEDGER_URL"], autocommit=True, application_name="kt-ledger"
        )
        _local.conn = conn
        _opened.append(conn)
    return conn


def close_connections():
    """Close the ledger connections (for in-process use; a process exit closes them too)."""
    while _opened:
        _opened.pop().close()


def _record(helpers, phase):
    job = helpers.job
    params = (job.id, job.payload.get("n"), job.attempts, os.getpid(), job.locked_by, phase)
    if os.environ.get("KONGTASK_LEDGER_VIA") == "pool":
        with helpers.with_connection() as conn:
            conn.execute(_INSERT, params)
    else:
        _own_connection().execute(_INSERT, params)


def work(payload, helpers):
    attempt = helpers.job.attempts
    if payload.get("mark_start"):
        _record(helpers, "start")
    ms = payload.get("ms", 0)
    if attempt == 1:
        ms = payload.get("first_ms", ms)
    if ms and helpers.abort_event.wait(ms / 1000):
        raise RuntimeError("aborted by shutdown")
    if attempt <= payload.get("fail_until", 0) and random.random() < payload.get("fail_p", 0.0):
        _record(helpers, "fail")
        raise RuntimeError("random failure on attempt %d" % attempt)
    _record(helpers, "ok")


tasks = {"work": work}
'''

# A worker started through ``kongtask.run`` with options the CLI does not
# expose (a short lock expiry and sweep interval): argv is URL, tasks file, JSON.
SCRIPT_SOURCE = """\
import json
import logging
import sys

import kongtask
from kongtask.jobs.task_loader import load_tasks

logging.basicConfig(level=logging.INFO, format="[%(name)s] %(levelname)s: %(message)s")
runner = kongtask.run(
    tasks=load_tasks(sys.argv[2]),
    connection_string=sys.argv[1],
    install_signal_handlers=True,
    **json.loads(sys.argv[3]),
)
while not runner.wait(timeout=0.5):
    pass
"""

_LEDGER_DDL = """
create table public.ledger (
    id bigserial primary key,
    job_id bigint not null,
    n int,
    attempt int not null,
    pid int not null,
    pool_id text,
    phase text not null,
    at timestamptz not null default clock_timestamp()
);
create table public.completions (
    job_id bigint not null,
    n int,
    attempts int not null,
    locked_by text,
    at timestamptz not null default clock_timestamp()
);
create function public.record_completions() returns trigger language plpgsql as $$
begin
    insert into public.completions (job_id, n, attempts, locked_by)
    select gone.id, (gone.payload->>'n')::int, gone.attempts, gone.locked_by from gone;
    return null;
end
$$;
"""

_TRIGGER = """
create trigger record_completions after delete on {s}._private_jobs
referencing old table as gone for each statement execute function public.record_completions()
"""


def install_ledger(conn: psycopg.Connection[Any], schema: str = SCHEMA) -> None:
    """Create the ledger and completions tables and the trigger feeding the latter."""
    conn.execute(_LEDGER_DDL)
    conn.execute(sql.SQL(_TRIGGER).format(s=sql.Identifier(schema)))


def write_tasks(folder: Path) -> Path:
    """Write the ledger task file into ``folder`` and return its path."""
    path = folder / "ledger_tasks.py"
    path.write_text(TASKS_SOURCE)
    return path


def make_specs(
    count: int, *, start: int = 0, queues: int = 0, queued_every: int = 0, **payload: Any
) -> list[dict[str, Any]]:
    """Job specs for task ``work`` numbered ``start..start+count-1``.

    With ``queues`` and ``queued_every``, every ``queued_every``-th job goes to
    named queue ``q{(n // queued_every) % queues}`` (serialised per queue, locked with its job).
    """
    specs = []
    for n in range(start, start + count):
        spec: dict[str, Any] = {"identifier": "work", "payload": {"n": n, **payload}}
        if queues and queued_every and n % queued_every == 0:
            spec["queue_name"] = f"q{(n // queued_every) % queues}"
        specs.append(spec)
    return specs


def enqueue(
    conn: psycopg.Connection[Any], specs: Sequence[dict[str, Any]], *, chunk: int = 5000
) -> None:
    """Add jobs through the schema's own ``add_jobs`` function, ``chunk`` at a time."""
    statement = sql.SQL(
        "select count(*) from {s}.add_jobs(array("
        "select json_populate_recordset(null::{s}.job_spec, %s::json)))"
    ).format(s=sql.Identifier(SCHEMA))
    for offset in range(0, len(specs), chunk):
        conn.execute(statement, (json.dumps(list(specs[offset : offset + chunk])),))


def wait_until(
    predicate: Callable[[], bool], *, timeout_s: float = 60.0, what: str = "a condition"
) -> float:
    """Re-check ``predicate`` until it holds; returns the seconds it took.

    Fails (AssertionError naming ``what``) at the deadline.
    """
    started = time.monotonic()
    deadline = started + timeout_s
    pause = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        pause.wait(0.05)
    return time.monotonic() - started


def scalar(conn: psycopg.Connection[Any], query: str, params: Any = None) -> Any:
    """The first column of the first row of ``query``."""
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


#: The jobs table's dead rows and vacuum count, as the statistics show them.
DEAD_AND_VACUUMS = sql.SQL(
    "select pg_stat_get_dead_tuples(tables.oid), pg_stat_get_vacuum_count(tables.oid) "
    "from pg_class as tables "
    "join pg_namespace as namespaces on namespaces.oid = tables.relnamespace "
    "where namespaces.nspname = {} and tables.relname = '_private_jobs'"
).format(sql.Literal(SCHEMA))


def dead_and_vacuums(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    """(dead rows, vacuums) of the jobs table."""
    row = conn.execute(DEAD_AND_VACUUMS).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def leave_dead_rows(conn: psycopg.Connection[Any], count: int) -> None:
    """Add and delete ``count`` jobs with autovacuum off for the jobs table, and wait for the
    statistics to show the dead rows (the worker's upkeep reads them there)."""
    conn.execute(
        sql.SQL("alter table {}._private_jobs set (autovacuum_enabled = false)").format(
            sql.Identifier(SCHEMA)
        )
    )
    enqueue(conn, make_specs(count))
    conn.execute(sql.SQL("delete from {}._private_jobs").format(sql.Identifier(SCHEMA)))
    conn.execute("select pg_stat_force_next_flush()")
    wait_until(lambda: dead_and_vacuums(conn)[0] >= count, timeout_s=30, what="the dead rows")


@dataclass
class LedgerReport:
    """What the database says happened to the enqueued jobs."""

    enqueued: int
    completed: int
    executions: int
    failed_executions: int
    lost: list[int]
    doubled_completions: list[int]
    repeated: dict[int, int]
    unexpected_repeats: list[int]
    completed_without_running: list[int]
    rows_left: int
    job_locks_left: int
    queue_locks_left: int
    allowed_repeats: set[int] = field(default_factory=set)

    def summary(self) -> str:
        """One line for the test output and the reliability report."""
        return (
            f"enqueued {self.enqueued}, completed {self.completed}, lost {len(self.lost)}, "
            f"doubled completions {len(self.doubled_completions)}, executions "
            f"{self.executions} ({self.failed_executions} failed), run twice "
            f"{len(self.repeated)} (allowed {len(self.allowed_repeats)}, unexpected "
            f"{len(self.unexpected_repeats)}), rows left {self.rows_left}, locks left "
            f"{self.job_locks_left + self.queue_locks_left}"
        )

    def assert_clean(self) -> None:
        """Every job completed exactly once, ran twice only where allowed, nothing left."""
        assert self.lost == [], f"lost jobs (n): {self.lost[:20]}"
        assert self.doubled_completions == [], f"completed twice: {self.doubled_completions[:20]}"
        assert self.unexpected_repeats == [], (
            f"ran more than once without a fault to explain it: {self.unexpected_repeats[:20]}"
        )
        assert self.completed_without_running == [], (
            f"completed with no successful run: {self.completed_without_running[:20]}"
        )
        assert self.completed == self.enqueued
        assert (self.rows_left, self.job_locks_left, self.queue_locks_left) == (0, 0, 0)


def check_ledger(
    conn: psycopg.Connection[Any], enqueued: Iterable[int], allowed_repeats: Iterable[int] = ()
) -> LedgerReport:
    """Compare the enqueued job numbers with the completions and the ledger."""
    expected = set(enqueued)
    allowed = set(allowed_repeats)
    completions = dict(conn.execute("select n, count(*) from public.completions group by n"))
    runs = dict(conn.execute("select n, count(*) from public.ledger where phase = 'ok' group by n"))
    executions = scalar(conn, "select count(*) from public.ledger where phase <> 'start'")
    failed = scalar(conn, "select count(*) from public.ledger where phase = 'fail'")
    repeated = {n: count for n, count in runs.items() if count > 1}
    s = sql.Identifier(SCHEMA)
    rows_left = scalar(conn, sql.SQL("select count(*) from {}._private_jobs").format(s))
    job_locks = scalar(
        conn,
        sql.SQL("select count(*) from {}._private_jobs where locked_at is not null").format(s),
    )
    queue_locks = scalar(
        conn,
        sql.SQL("select count(*) from {}._private_job_queues where locked_at is not null").format(
            s
        ),
    )
    return LedgerReport(
        enqueued=len(expected),
        completed=len(expected & set(completions)),
        executions=executions,
        failed_executions=failed,
        lost=sorted(expected - set(completions)),
        doubled_completions=sorted(n for n, count in completions.items() if count > 1),
        repeated=repeated,
        unexpected_repeats=sorted(set(repeated) - allowed),
        completed_without_running=sorted(set(completions) - set(runs)),
        rows_left=rows_left,
        job_locks_left=job_locks,
        queue_locks_left=queue_locks,
        allowed_repeats=allowed,
    )


_READY = re.compile(r"Worker connected and looking for jobs\.\.\. \(pool (\S+),")


class WorkerProcess:
    """A kongtask worker in a subprocess, its output in a log file."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.pool_id: str | None = None

    @staticmethod
    def _env(db_url: str, extra: dict[str, str] | None) -> dict[str, str]:
        env = dict(os.environ)
        env["KONGTASK_LEDGER_URL"] = to_uri(db_url)
        env.update(extra or {})
        return env

    @classmethod
    def cli(
        cls,
        db_url: str,
        tasks: Path,
        log_path: Path,
        *,
        jobs: int = 4,
        poll_ms: int = 200,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> WorkerProcess:
        """``kongtask -c URL --tasks FILE -j N --poll-interval MS``."""
        argv = [sys.executable, "-m", "kongtask", "-c", to_uri(db_url), "--tasks", str(tasks)]
        argv += ["-j", str(jobs), "--poll-interval", str(poll_ms), *args]
        return cls(argv, log_path, cls._env(db_url, env))

    @classmethod
    def script(
        cls, db_url: str, tasks: Path, log_path: Path, options: dict[str, Any]
    ) -> WorkerProcess:
        """A worker started by ``kongtask.run(**options)`` in a small script."""
        script = log_path.with_suffix(".py")
        script.write_text(SCRIPT_SOURCE)
        argv = [sys.executable, str(script), to_uri(db_url), str(tasks), json.dumps(options)]
        return cls(argv, log_path, cls._env(db_url, None))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 30.0) -> str:
        """Wait for the 'Worker connected' line; returns the pool id."""

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            match = _READY.search(self.log())
            if match:
                self.pool_id = match.group(1)
            return match is not None

        wait_until(ready, timeout_s=timeout_s, what=f"worker {self.pid} to start")
        assert self.pool_id is not None
        return self.pool_id

    def send(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float = 30.0) -> int:
        return self.proc.wait(timeout_s)

    def close(self) -> None:
        """Stop the process if it still runs (SIGTERM, then SIGKILL) and close the log."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
