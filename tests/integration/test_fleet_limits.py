"""Fleet-wide limits and pauses with several real worker processes on one schema.

Each handler records its own start and end (the database's clock_timestamp)
in ``public.limit_runs``; how many ran at once is measured from those
records, never from the workers' word.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from kongtask import JobSpec, WorkerUtils
from kongtask.errors import ConfigurationError
from tests.acceptance.test_cli_basics import kongtask as run_cli
from tests.conftest import to_uri
from tests.faults.ledger import WorkerProcess, scalar, wait_until

pytestmark = pytest.mark.faults

TASKS = '''\
"""Handlers that record when they start and end (for the limit tests)."""

import os
import threading
import time

import psycopg

_local = threading.local()


def _conn():
    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed:
        conn = _local.conn = psycopg.connect(os.environ["KONGTASK_LEDGER_URL"], autocommit=True)
    return conn


def _run(payload, helpers):
    job = helpers.job
    conn = _conn()
    row = conn.execute(
        "insert into public.limit_runs (job_id, task, pid, started_at) "
        "values (%s, %s, %s, clock_timestamp()) returning id",
        (job.id, job.task_identifier, os.getpid()),
    ).fetchone()
    time.sleep(payload.get("s", 0))
    conn.execute("update public.limit_runs set ended_at = clock_timestamp() where id = %s", row)


limited = _run
free = _run
rated = _run
'''


@pytest.fixture
def tasks(tmp_path: Path, db: psycopg.Connection[Any]) -> Path:
    db.execute(
        "create table public.limit_runs (id serial primary key, job_id bigint, task text, "
        "pid int, started_at timestamptz, ended_at timestamptz)"
    )
    path = tmp_path / "limit_tasks.py"
    path.write_text(TASKS)
    return path


@pytest.fixture
def utils(db_url: str) -> Iterator[WorkerUtils]:
    with WorkerUtils(db_url) as opened:
        yield opened


@pytest.fixture
def start_workers(db_url: str, tasks: Path, tmp_path: Path) -> Iterator[Any]:
    started: list[WorkerProcess] = []

    def start(count: int = 3, jobs: int = 4) -> list[WorkerProcess]:
        workers = [
            WorkerProcess.cli(
                db_url,
                tasks,
                tmp_path / f"worker{len(started) + i}.log",
                jobs=jobs,
                poll_ms=1000,
                args=["--local-queue-size", "1"],
            )
            for i in range(count)
        ]
        started.extend(workers)
        for worker in workers:
            worker.wait_ready(60)
        return workers

    yield start
    for worker in started:
        worker.close()


Interval = tuple[datetime, datetime]


def runs(db: psycopg.Connection[Any], task: str) -> list[Interval]:
    return [
        (start, end)
        for start, end in db.execute(
            "select started_at, ended_at from public.limit_runs where task = %s "
            "and ended_at is not null order by started_at",
            (task,),
        )
    ]


def max_overlap(intervals: list[Interval], since: datetime | None = None) -> int:
    """The most intervals running at one instant (at or after ``since``)."""
    edges = sorted(
        [(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals],
        key=lambda edge: (edge[0], edge[1]),  # an end before a start at the same instant
    )
    running = most = 0
    for when, step in edges:
        running += step
        if since is None or when >= since:
            most = max(most, running)
    return most


def done(db: psycopg.Connection[Any], count: int) -> Any:
    return lambda: scalar(db, "select count(ended_at) from public.limit_runs") >= count


def test_a_concurrency_limit_holds_across_processes_and_keeps_its_slots_busy(
    db: psycopg.Connection[Any], utils: WorkerUtils, start_workers: Any
) -> None:
    utils.set_limit("limited", concurrency=2)
    utils.set_limit(flag="tenant:7", concurrency=1)
    start_workers(3, jobs=4)
    utils.add_jobs(
        [JobSpec("limited", {"s": 0.3}) for _ in range(30)]
        + [JobSpec("free", {"s": 0.3}) for _ in range(12)]
        + [JobSpec("free", {"s": 0.2}, flags=["tenant:7"]) for _ in range(6)]
    )
    wait_until(done(db, 48), timeout_s=60, what="48 jobs to finish")
    limited = runs(db, "limited")
    assert len(limited) == 30
    assert max_overlap(limited) == 2
    wall = (limited[-1][1] - limited[0][0]).total_seconds()
    # 15 rounds of 0.3 s: about 4.5 s when the two slots stay busy.
    print(f"30 x 0.3 s at concurrency 2 across 3 processes: {wall:.2f} s")
    assert wall < 7.0, wall
    # The flag limit: the tenant's jobs ran one at a time.
    tenant = [
        (start, end)
        for start, end in db.execute(
            "select r.started_at, r.ended_at from public.limit_runs r "
            "where r.task = 'free' and r.ended_at - r.started_at < interval '0.25 s'"
        )
    ]
    assert len(tenant) == 6 and max_overlap(tenant) == 1
    # Unlimited work was not held back: more than two free jobs ran at once.
    assert max_overlap(runs(db, "free")) > 2
    assert utils.list_limits()[0].running == 0


def test_a_rate_limit_holds_across_processes(
    db: psycopg.Connection[Any], utils: WorkerUtils, start_workers: Any
) -> None:
    utils.set_limit("rated", rate="4/s")
    start_workers(3, jobs=4)
    utils.add_jobs([JobSpec("rated", {"s": 0}) for _ in range(12)])
    wait_until(done(db, 12), timeout_s=60, what="12 rated jobs to finish")
    starts = [start for start, _ in runs(db, "rated")]
    # At most 4 starts in any window of 1 s (less a margin for the handler's own start).
    window = timedelta(seconds=0.9)
    assert max(sum(1 for s in starts if first <= s < first + window) for first in starts) <= 4
    # 12 starts at 4 per second need at least two more windows after the first.
    assert (starts[-1] - starts[0]).total_seconds() >= 1.8


def test_pause_resume_and_a_lowered_limit_reach_running_pools(
    db: psycopg.Connection[Any], utils: WorkerUtils, start_workers: Any
) -> None:
    workers = start_workers(3, jobs=4)
    utils.add_jobs([JobSpec("limited", {"s": 0.5}) for _ in range(80)])
    utils.add_jobs([JobSpec("orphan", {}) for _ in range(3)])
    wait_until(
        lambda: scalar(db, "select count(*) from public.limit_runs") >= 12,
        what="the first jobs to start",
    )
    paused = utils.pause("limited", by="ops-test")
    paused_at = scalar(db, "select clock_timestamp()")
    assert (paused.key_kind, paused.key, paused.paused_by) == ("task", "limited", "ops-test")
    # Running jobs finish; nothing starts after the change has had 2 s to arrive.
    wait_until(
        lambda: scalar(db, "select count(*) from public.limit_runs where ended_at is null") == 0,
        timeout_s=10,
        what="the running jobs to finish",
    )
    # Absence needs a window: until 3.5 s after the pause (the running jobs took 0.5 s).
    wait_until(
        lambda: scalar(db, "select clock_timestamp() > %s + interval '3.5 s'", (paused_at,)),
        timeout_s=10,
        what="a window after the pause",
    )
    late = scalar(
        db,
        "select count(*) from public.limit_runs where started_at > %s + interval '2 s'",
        (paused_at,),
    )
    assert late == 0
    waiting = db.execute(
        "select count(*), max(attempts), count(locked_at) from graphile_worker.jobs "
        "where task_identifier = 'limited'"
    ).fetchone()
    assert waiting is not None
    left, attempts, locked = waiting
    assert left > 0 and attempts == 0 and locked == 0

    report = utils.status()
    assert [(p.key, p.paused_by) for p in report.pauses] == [("limited", "ops-test")]
    assert "no live pool serves task `orphan`: 3 ready" in report.warnings
    assert not any("`limited`" in warning for warning in report.warnings)

    utils.resume("limited")
    resumed_at = scalar(db, "select clock_timestamp()")
    wait_until(
        lambda: (
            scalar(
                db, "select count(*) from public.limit_runs where started_at > %s", (resumed_at,)
            )
            >= 12
        ),
        timeout_s=10,
        what="jobs to start again after resume",
    )
    utils.set_limit("limited", concurrency=1)
    limited_at = scalar(db, "select clock_timestamp()")
    wait_until(
        lambda: (
            scalar(
                db, "select count(*) from graphile_worker.jobs where task_identifier = 'limited'"
            )
            == 0
        ),
        timeout_s=90,
        what="the limited jobs to drain",
    )
    # Jobs running when the limit came finish (0.5 s); 2 s later one runs at a time.
    settled = limited_at + timedelta(seconds=2.5)
    after = [(s, e) for s, e in runs(db, "limited") if e > settled]
    assert after and max_overlap(after, since=settled) == 1
    for worker in workers:
        assert worker.proc.poll() is None


def test_status_warns_of_limited_jobs_held_outside_kongtask_pools(
    db: psycopg.Connection[Any], utils: WorkerUtils
) -> None:
    utils.set_limit("limited", concurrency=3)
    job = utils.add_job("limited")
    db.execute(
        "update graphile_worker._private_jobs set locked_by = 'node-worker-1', "
        "locked_at = now() where id = %s",
        (job.id,),
    )
    report = utils.status()
    assert [(limit.key, limit.concurrency, limit.running) for limit in report.limits] == [
        ("limited", 3, 1)
    ]
    assert any("`limited` locked by `node-worker-1`" in w for w in report.warnings), report.warnings


def test_bad_input_is_refused_and_changes_nothing(db_url: str, utils: WorkerUtils) -> None:
    for call, match in [
        (lambda: utils.set_limit("t", concurrency=0), "concurrency must be"),
        (lambda: utils.set_limit("t"), "give concurrency"),
        (lambda: utils.set_limit("t", rate="5/d"), "rate '5/d'"),
        (lambda: utils.set_limit("t", queue="q", concurrency=1), "exactly one"),
        (lambda: utils.set_limit(concurrency=1), "exactly one"),
        (lambda: utils.pause(), "exactly one"),
        (lambda: utils.pause("t", by=""), "by must be"),
    ]:
        with pytest.raises(ConfigurationError, match=match):
            call()
    assert utils.list_limits() == [] and utils.list_pauses() == []
    url = to_uri(db_url)
    bad = run_cli("limits", "set", "t", "--concurrency", "0", "-c", url)
    assert bad.returncode != 0 and "concurrency must be" in bad.stderr
    bad = run_cli("limits", "set", "t", "--rate", "ten/s", "-c", url)
    assert bad.returncode != 0 and "rate 'ten/s'" in bad.stderr
    assert utils.list_limits() == []


def test_the_cli_sets_lists_and_clears(db_url: str, utils: WorkerUtils) -> None:
    url = to_uri(db_url)
    ok = run_cli("limits", "set", "resize", "--concurrency", "2", "--rate", "5/m", "-c", url)
    assert ok.returncode == 0, ok.stderr
    assert "concurrency 2, rate 5/m" in ok.stdout
    assert run_cli("limits", "set", "--queue", "mail", "--rate", "10/s", "-c", url).returncode == 0
    listing = run_cli("limits", "list", "-c", url)
    assert "resize" in listing.stdout and "5/m" in listing.stdout and "10/s" in listing.stdout
    assert run_cli("pause", "--queue", "mail", "--by", "alice", "-c", url).returncode == 0
    assert "alice" in run_cli("pauses", "-c", url).stdout
    assert "alice" in run_cli("status", "-c", url).stdout
    assert run_cli("resume", "--queue", "mail", "-c", url).returncode == 0
    assert run_cli("resume", "--queue", "mail", "-c", url).returncode == 1
    assert run_cli("limits", "clear", "resize", "-c", url).returncode == 0
    assert [(lim.key_kind, lim.key) for lim in utils.list_limits()] == [("queue", "mail")]


def test_the_periodic_check_applies_a_change_whose_notice_was_missed(
    db: psycopg.Connection[Any], utils: WorkerUtils, start_workers: Any
) -> None:
    start_workers(1, jobs=2)
    utils.add_jobs([JobSpec("limited", {"s": 0.2}) for _ in range(60)])
    wait_until(
        lambda: scalar(db, "select count(*) from public.limit_runs") >= 2,
        what="the first jobs to start",
    )
    # Written behind kongtask's back: no kongtask:limits notice is sent.
    db.execute(
        "insert into graphile_worker._kongtask_pauses (key_kind, key, paused_by) "
        "values ('task', 'limited', 'sql')"
    )
    paused_at = scalar(db, "select clock_timestamp()")
    # Absence needs a window: a second past the 2 s check and the job then running.
    wait_until(
        lambda: scalar(db, "select clock_timestamp() > %s + interval '3.5 s'", (paused_at,)),
        timeout_s=10,
        what="the periodic check and a second more",
    )
    late = scalar(
        db,
        "select count(*) from public.limit_runs where started_at > %s + interval '2.5 s'",
        (paused_at,),
    )
    assert late == 0
    assert scalar(db, "select count(*) from graphile_worker.jobs where attempts = 0") > 0
