"""Scale benchmark: claim cost and worker memory as the backlog grows; several processes.

Usage: ``python tools/bench_scale.py [--backlogs 10000,100000,1000000] [--claims 200]
[--run 20000] [--processes 1,2,4] [--drain 50000] [--dead 100000] [--rounds 3]``.

Creates scratch databases on ``KONGTASK_BENCH_URL`` (or ``DATABASE_URL``, else
postgresql://postgres@127.0.0.1:5432/postgres) and drops them afterwards.

1. Backlog: for each size, that many no-op jobs wait (added through the
   schema's ``add_jobs``, then ``vacuum analyze``). The pool's own claim
   statement (``get_jobs``, batch 24) is timed ``--claims`` times, each in a
   transaction rolled back so every claim sees the same backlog; then a real
   worker (``kongtask -j 24``) runs the first ``--run`` jobs and is stopped:
   its rate and peak RSS (``VmHWM``) are printed. Flat means neither grows
   with the backlog.
2. Processes: ``--drain`` no-op jobs drained by 1, 2 and 4 independent
   ``kongtask --once -j 24`` processes started together (table truncated and
   analyzed before each run; rounds alternate the order).
3. Dead rows: ``--dead`` jobs are drained by a worker without any vacuum
   (autovacuum and the worker's upkeep off), so their deleted rows stay; then
   10,000 jobs are added and analyzed, the claim is timed and the 10,000
   drained. Three sides, each on a new database: the dead rows left as they
   are; the drain by a worker with its upkeep on (it vacuums the table it
   finds bloated), the claim timed afterwards on the table it left; and the
   table vacuumed first. Printed: the ratios to the vacuumed side.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kongtask.db.statements import Queries
from tools._bench_common import (
    fresh_jobs_table,
    percentile,
    scratch_database,
    server_url,
    summary,
)

NOOP_TASKS = """
def noop(payload, helpers):
    pass

tasks = {"noop": noop}
"""

FILL = """
select count(*) from graphile_worker.add_jobs(array(
    select json_populate_record(
        null::graphile_worker.job_spec,
        json_build_object('identifier', 'noop', 'payload', json_build_object('id', i))
    )
    from generate_series(%(first)s::int, %(last)s::int) as i
))
"""

BATCH = 24


def kongtask_cli() -> list[str]:
    """The installed ``kongtask`` console script, else ``python -m kongtask``."""
    script = Path(sys.executable).with_name("kongtask")
    return [str(script)] if script.exists() else [sys.executable, "-m", "kongtask"]


def fill(url: str, count: int) -> None:
    """Add ``count`` no-op jobs in chunks of 100,000 (untimed), then vacuum analyze."""
    with psycopg.connect(url, autocommit=True) as conn:
        for first in range(1, count + 1, 100_000):
            last = min(count, first + 99_999)
            conn.execute(FILL, {"first": first, "last": last})
        conn.execute("vacuum analyze graphile_worker._private_jobs")


def waiting(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("select count(*) from graphile_worker._private_jobs").fetchone()
        return int(row[0]) if row else -1


def claim_times(url: str, claims: int) -> list[float]:
    """Milliseconds per claim of ``BATCH`` jobs, each rolled back (the same backlog every time)."""
    statement = Queries("graphile_worker").get_jobs
    times = []
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "select id from graphile_worker._private_tasks where identifier = 'noop'"
        ).fetchone()
        assert row is not None, "no noop task row"
        conn.rollback()
        params = {
            "now": None,
            "task_ids": [row[0]],
            "forbidden_flags": None,
            "excluded_queues": [],
            "batch": BATCH,
            "pool_id": "bench-scale",
        }
        for _ in range(claims):
            started = time.perf_counter()
            rows = conn.execute(statement, params).fetchall()
            times.append((time.perf_counter() - started) * 1000)
            conn.rollback()
            assert len(rows) == BATCH, f"claimed {len(rows)} of {BATCH}"
    return sorted(times)


def peak_rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


def run_some(url: str, tasks_file: Path, count: int) -> tuple[float, float]:
    """Run a worker until ``count`` jobs are done, then stop it: (jobs/s, peak RSS MB)."""
    before = waiting(url)
    count = min(count, before)  # a backlog smaller than --run: time all of it
    argv = [*kongtask_cli(), "-c", url, "--tasks", str(tasks_file), "-j", "24"]
    child = subprocess.Popen(
        argv, env=dict(os.environ, NO_LOG_SUCCESS="1"), stderr=subprocess.DEVNULL
    )
    peak = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            value = peak_rss_mb(child.pid)
            if value is not None:
                peak[0] = max(peak[0], value)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    deadline = started + 600
    try:
        # The first job done marks the start (spawn and start-up are not the backlog's cost).
        while waiting(url) >= before and time.perf_counter() < deadline:
            time.sleep(0.005)
        first = time.perf_counter()
        left_at_first = waiting(url)
        while before - waiting(url) < count and time.perf_counter() < deadline:
            time.sleep(0.02)
        elapsed = time.perf_counter() - first
        ran = left_at_first - waiting(url)
    finally:
        child.send_signal(signal.SIGTERM)
        child.wait(60)
        done.set()
        sampler.join()
    return ran / elapsed, peak[0]


def drain_together(
    url: str, tasks_file: Path, processes: int, extra: list[str] | None = None
) -> float:
    """Seconds for ``processes`` independent ``--once`` workers to drain the table."""
    argv = [*kongtask_cli(), "-c", url, "--tasks", str(tasks_file), "--once", "-j", "24"]
    argv += extra or []
    started = time.perf_counter()
    children = [
        subprocess.Popen(argv, env=dict(os.environ, NO_LOG_SUCCESS="1"), stderr=subprocess.DEVNULL)
        for _ in range(processes)
    ]
    for child in children:
        if child.wait(900) != 0:
            raise SystemExit(f"a worker exited with {child.returncode}")
    wall = time.perf_counter() - started
    assert waiting(url) == 0, "jobs left behind"
    return wall


def ms(values: list[float]) -> str:
    return (
        f"p50 {percentile(values, 0.5):.2f} ms, p90 {percentile(values, 0.9):.2f} ms, "
        f"p99 {percentile(values, 0.99):.2f} ms"
    )


def backlog(args: Any, tasks_file: Path) -> None:
    sizes = [int(s) for s in args.backlogs.split(",") if s.strip()]
    print(f"\n1. backlog: claim of {BATCH} timed {args.claims}x; then -j 24 runs {args.run} jobs")
    for size in sizes:
        with scratch_database(server_url()) as url:
            fill(url, size)
            times = claim_times(url, args.claims)
            rate, rss = run_some(url, tasks_file, args.run)
            print(
                f"  {size:>9,} waiting: claim {ms(times)}; "
                f"worker {rate:,.0f} jobs/s, peak RSS {rss:.1f} MB"
            )


def processes(args: Any, tasks_file: Path) -> None:
    counts = [int(s) for s in args.processes.split(",") if s.strip()]
    print(
        f"\n2. processes: {args.drain} no-op jobs drained by N independent "
        f"`kongtask --once -j 24` processes; {args.rounds} rounds, order alternated"
    )
    results: dict[int, list[float]] = {n: [] for n in counts}
    with scratch_database(server_url()) as url:
        for round_ in range(args.rounds):
            order = counts if round_ % 2 == 0 else list(reversed(counts))
            for n in order:
                fresh_jobs_table(url)
                fill(url, args.drain)
                results[n].append(drain_together(url, tasks_file, n))
    for n in counts:
        best, median = summary(results[n])
        print(
            f"  {n} process(es): best {args.drain / best:,.0f} jobs/s, "
            f"median {args.drain / median:,.0f} jobs/s"
        )


#: The worker's own vacuum off: the dead rows stay for the side that measures them.
NO_UPKEEP = ["--vacuum-after-dead-rows", "0"]


def make_dead_rows(url: str, tasks_file: Path, count: int) -> None:
    """Drain ``count`` jobs with autovacuum and the worker's upkeep off, leaving their dead rows."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("alter table graphile_worker._private_jobs set (autovacuum_enabled = false)")
    fill(url, count)
    drain_together(url, tasks_file, 1, NO_UPKEEP)


def dead_count(url: str) -> int:
    """The jobs table's dead rows as the statistics show them (pending counts flushed first)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("select pg_stat_force_next_flush()")
        conn.execute("select 1")
        row = conn.execute(
            "select n_dead_tup from pg_stat_user_tables where relname = '_private_jobs'"
        ).fetchone()
    return int(row[0]) if row else -1


def live_jobs(url: str, count: int) -> None:
    """Add ``count`` jobs and analyze (no vacuum: dead rows, if any, stay)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(FILL, {"first": 1, "last": count})
        conn.execute("analyze graphile_worker._private_jobs")


#: The dead-row sides: how the table is prepared, and the worker's upkeep option.
DEAD_SIDES = {
    "dead rows": "dead rows left, worker upkeep off",
    "upkeep": "dead rows left, worker upkeep on (default)",
    "vacuumed": "dead rows left, then vacuum analyze",
}


def dead_rows(args: Any, tasks_file: Path) -> None:
    live = 10_000
    print(
        f"\n3. dead rows: {args.dead} jobs drained with autovacuum and the worker's upkeep off "
        f"(their dead rows stay), then {live} jobs added and analyzed and drained by "
        f"`kongtask --once -j 24`; each side on a new database, {args.rounds} rounds, order "
        f"rotated. 'dead rows': the claim timed {args.claims}x (rolled back) before the "
        "drain, which runs with upkeep off. 'upkeep': the drain runs with the worker's "
        f"upkeep on (its default), then {live} jobs are added again and the claim timed on "
        "the table as the worker left it. 'vacuumed': vacuum analyze first."
    )
    for side, what in DEAD_SIDES.items():
        print(f"  {side}: {what}")
    results: dict[str, list[tuple[list[float], float, int]]] = {side: [] for side in DEAD_SIDES}
    names = list(DEAD_SIDES)
    for round_ in range(args.rounds):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for side in order:
            with scratch_database(server_url()) as url:
                make_dead_rows(url, tasks_file, args.dead)
                if side == "vacuumed":
                    with psycopg.connect(url, autocommit=True) as conn:
                        conn.execute("vacuum analyze graphile_worker._private_jobs")
                live_jobs(url, live)
                if side == "upkeep":
                    wall = drain_together(url, tasks_file, 1)
                    live_jobs(url, live)
                    dead = dead_count(url)
                    times = claim_times(url, args.claims)
                else:
                    dead = dead_count(url)
                    times = claim_times(url, args.claims)
                    wall = drain_together(url, tasks_file, 1, NO_UPKEEP)
                results[side].append((times, wall, dead))
    medians = {}
    for side, rows in results.items():
        claim_p50 = [percentile(times, 0.5) for times, _, _ in rows]
        claim_p99 = [percentile(times, 0.99) for times, _, _ in rows]
        best, median = summary([wall for _, wall, _ in rows])
        medians[side] = (summary(claim_p50)[1], median)
        print(
            f"  {side:>9}: dead rows when timed {[dead for _, _, dead in rows]}; claim p50 min "
            f"{min(claim_p50):.2f} / median {medians[side][0]:.2f} ms, p99 min "
            f"{min(claim_p99):.2f} ms; drain {live} best {live / best:,.0f} jobs/s, median "
            f"{live / median:,.0f} jobs/s"
        )
    for side in ("dead rows", "upkeep"):
        print(
            f"  ratio {side} / vacuumed (medians): claim p50 "
            f"{medians[side][0] / medians['vacuumed'][0]:.2f}x, drain time "
            f"{medians[side][1] / medians['vacuumed'][1]:.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlogs", default="10000,100000,1000000")
    parser.add_argument("--claims", type=int, default=200)
    parser.add_argument("--run", type=int, default=20_000)
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument("--drain", type=int, default=50_000)
    parser.add_argument("--dead", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=["backlog", "processes", "dead"], default=None)
    args = parser.parse_args()
    print(f"server: {server_url()}; cores: {os.cpu_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        tasks_file = Path(tmp, "noop_tasks.py")
        tasks_file.write_text(NOOP_TASKS)
        if args.only in (None, "backlog"):
            backlog(args, tasks_file)
        if args.only in (None, "processes"):
            processes(args, tasks_file)
        if args.only in (None, "dead"):
            dead_rows(args, tasks_file)


if __name__ == "__main__":
    main()
