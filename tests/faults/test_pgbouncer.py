"""Behind a real pgbouncer in transaction pooling, with the one switch (``--pgbouncer``).

- a worker claims and completes jobs through pgbouncer (no prepared
  statements), and without a listen connection says in its log that it polls;
- with ``--listen-connection`` (direct), wake-ups come by NOTIFY, as fast as
  a worker connected directly;
- ``kongtask admin unlock-dead --yes`` through pgbouncer never unlocks a live
  pool's jobs (it reads the liveness records, not ``pg_stat_activity``,
  where pgbouncer's server sessions carry whichever client's name came last).
"""

from __future__ import annotations

import signal
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from kongtask.ops.cli.admin import find_dead_pools
from tests.conftest import to_uri

from .ledger import (
    WorkerProcess,
    check_ledger,
    dead_and_vacuums,
    enqueue,
    install_ledger,
    leave_dead_rows,
    make_specs,
    scalar,
    wait_until,
    write_tasks,
)
from .pgbouncer import Pgbouncer, pgbouncer_fixture  # noqa: F401  (the fixture)

pytestmark = pytest.mark.faults


def _worker(
    url: str, direct: str, tasks: Path, log: Path, *args: str, jobs: int = 4, poll_ms: int = 200
) -> WorkerProcess:
    # The ledger writes directly (its own connections prepare statements).
    return WorkerProcess.cli(
        url,
        tasks,
        log,
        jobs=jobs,
        poll_ms=poll_ms,
        args=args,
        env={"KONGTASK_LEDGER_URL": to_uri(direct)},
    )


def _stop(worker: WorkerProcess) -> None:
    worker.send(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.log()


def test_worker_runs_jobs_through_pgbouncer_and_says_it_polls(
    pgbouncer: Pgbouncer, db_url: str, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    install_ledger(db)
    tasks = write_tasks(tmp_path)
    bounced = pgbouncer.conninfo(db_url)
    worker = _worker(bounced, db_url, tasks, tmp_path / "worker.log", "--pgbouncer")
    try:
        worker.wait_ready()
        total = 300
        enqueue(db, make_specs(total, queues=3, queued_every=5))
        wait_until(
            lambda: scalar(db, "select count(*) from graphile_worker._private_jobs") == 0,
            timeout_s=60,
            what="the jobs to complete through pgbouncer",
        )
        _stop(worker)
        log = worker.log()
        assert "polling for new jobs every 200 ms" in log
        assert "listen_connection_string (--listen-connection)" in log
        assert "Prepared" not in log and "prepared statement" not in log
        report = check_ledger(db, range(total))
        print(f"\npgbouncer (transaction pooling, --pgbouncer): {report.summary()}")
        report.assert_clean()
    finally:
        worker.close()


def _wakeup_latencies(
    db: psycopg.Connection[Any], worker: WorkerProcess, start: int, count: int
) -> list[float]:
    """Add jobs one at a time; for each, database time from add_job to its handler's start."""
    latencies = []
    for n in range(start, start + count):
        created = scalar(
            db,
            "select created_at from graphile_worker.add_job('work', json_build_object("
            "'n', %s::int, 'mark_start', true))",
            (n,),
        )
        wait_until(
            lambda n=n: scalar(db, "select count(*) from ledger where n = %s", (n,)) > 0,
            timeout_s=30,
            what=f"job {n} to start",
        )
        started = scalar(db, "select min(at) from ledger where n = %s", (n,))
        latencies.append((started - created).total_seconds())
    assert worker.proc.poll() is None
    return latencies


def test_listen_connection_gives_direct_wakeups_behind_pgbouncer(
    pgbouncer: Pgbouncer, db_url: str, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    install_ledger(db)
    tasks = write_tasks(tmp_path)
    bounced = pgbouncer.conninfo(db_url)
    # A 10 s poll interval: only NOTIFY can wake the worker quickly.
    direct = _worker(db_url, db_url, tasks, tmp_path / "direct.log", jobs=1, poll_ms=10_000)
    try:
        direct.wait_ready()
        direct_latencies = _wakeup_latencies(db, direct, 0, 15)
        _stop(direct)
    finally:
        direct.close()
    via = _worker(
        bounced,
        db_url,
        tasks,
        tmp_path / "bounced.log",
        "--pgbouncer",
        "--listen-connection",
        to_uri(db_url),
        jobs=1,
        poll_ms=10_000,
    )
    try:
        via.wait_ready()
        bounced_latencies = _wakeup_latencies(db, via, 100, 15)
        _stop(via)
        assert "polling" not in via.log()
    finally:
        via.close()
    direct_median = statistics.median(direct_latencies)
    bounced_median = statistics.median(bounced_latencies)
    print(
        f"\nwake-up latency, add_job -> handler start, median of 15: direct "
        f"{direct_median * 1000:.1f} ms, through pgbouncer with a direct listen connection "
        f"{bounced_median * 1000:.1f} ms (max {max(bounced_latencies) * 1000:.1f} ms)"
    )
    assert bounced_median < 0.25
    assert bounced_median < direct_median + 0.1


def test_unlock_dead_through_pgbouncer_spares_live_pools(
    pgbouncer: Pgbouncer, db_url: str, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    install_ledger(db)
    tasks = write_tasks(tmp_path)
    bounced = pgbouncer.conninfo(db_url)
    workers = [
        _worker(bounced, db_url, tasks, tmp_path / f"worker{i}.log", "--pgbouncer", jobs=2)
        for i in range(3)
    ]
    try:
        for worker in workers:
            worker.wait_ready()
        total = 80
        enqueue(db, make_specs(total, queues=2, queued_every=4, ms=400))
        live = [worker.pool_id for worker in workers]
        wait_until(
            lambda: (
                scalar(
                    db,
                    "select count(distinct locked_by) from graphile_worker._private_jobs "
                    "where locked_by = any(%s)",
                    (live,),
                )
                == 3
            ),
            timeout_s=30,
            what="every live pool to hold jobs",
        )
        held_before = scalar(
            db,
            "select count(*) from graphile_worker._private_jobs where locked_by is not null",
        )
        # Look many times while both pools work: pgbouncer's server sessions carry
        # whichever client's application_name came last, so a check based on
        # pg_stat_activity would see a live pool "without a session" now and then.
        seen: list[str] = []
        with psycopg.connect(bounced, autocommit=True, prepare_threshold=None) as conn:
            for _ in range(40):
                seen += [pool.pool_id for pool in find_dead_pools(conn, "graphile_worker")]
        assert seen == []
        admin = [sys.executable, "-m", "kongtask", "admin", "-c", to_uri(bounced)]
        result = subprocess.run(
            [*admin, "unlock-dead", "--yes"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "No dead pools hold locks", result.stdout
        assert held_before > 0
        wait_until(
            lambda: scalar(db, "select count(*) from graphile_worker._private_jobs") == 0,
            timeout_s=90,
            what="the live pools to finish their jobs",
        )
        for worker in workers:
            _stop(worker)
        report = check_ledger(db, range(total))
        print(f"\nunlock-dead --yes through pgbouncer with 3 live pools: {report.summary()}")
        report.assert_clean()
    finally:
        for worker in workers:
            worker.close()


def test_a_worker_vacuums_a_bloated_table_through_pgbouncer(
    pgbouncer: Pgbouncer, db_url: str, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    """The worker's upkeep vacuum is one statement outside a transaction: pgbouncer in
    transaction pooling passes it like any other."""
    install_ledger(db)
    leave_dead_rows(db, 3_000)
    assert dead_and_vacuums(db) == (3_000, 0)
    bounced = pgbouncer.conninfo(db_url)
    worker = _worker(
        bounced, db_url, write_tasks(tmp_path), tmp_path / "worker.log", "--pgbouncer",
        "--vacuum-after-dead-rows", "1000",
    )  # fmt: skip
    try:
        worker.wait_ready()
        wait_until(
            lambda: "Vacuumed the jobs table in" in worker.log(),
            timeout_s=30,
            what="the worker's vacuum",
        )
        dead, vacuums = dead_and_vacuums(db)
        assert vacuums >= 1 and dead < 1_000, (dead, vacuums)
        _stop(worker)
        assert "Vacuuming the jobs table: 3000 dead rows" in worker.log()
    finally:
        worker.close()
