"""Ceiling probe: kongtask's own claim and complete statements from the tightest loop.

Usage: ``python tools/bench_ceiling.py [-n 100000] [--batch 500] [--rounds 3]``.
No actors, no handlers, no Job objects: one connection runs ``Queries.get_jobs``
for a batch and ``Queries.complete_jobs`` for its ids until the table is empty
(``serial``), and then the same with claims and completes overlapped on two
connections (``overlapped``: a thread completes batch k while the next claim
runs). Jobs/s here is what this database on this machine allows the
statements kongtask sends; a worker's drain rate divided by it is the
fraction of the ceiling it reaches. Each round starts on a truncated,
analyzed jobs table; min and median are printed.
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kongtask.db.statements import Queries
from tools._bench_common import (
    enqueue_noop_jobs,
    fresh_jobs_table,
    scratch_database,
    server_url,
    summary,
)

POOL_ID = "pool-ceiling"


def _task_ids(conn: psycopg.Connection[Any]) -> list[int]:
    return [row[0] for row in conn.execute("select id from graphile_worker._private_tasks")]


def serial(url: str, batch: int, queries: Queries) -> int:
    """Claim and complete on one connection, one after the other; returns jobs done."""
    done = 0
    with psycopg.connect(url, autocommit=True) as conn:
        params = {"task_ids": _task_ids(conn), "forbidden_flags": None, "batch": batch, "now": None}
        params["pool_id"] = POOL_ID
        while True:
            rows = conn.execute(queries.get_jobs, params).fetchall()
            if not rows:
                return done
            ids = [row[0] for row in rows]
            conn.execute(queries.complete_jobs, {"ids": ids, "pool_id": POOL_ID})
            done += len(ids)


def overlapped(url: str, batch: int, queries: Queries) -> int:
    """Claim on one connection while another completes the previous batch."""
    pending: queue.SimpleQueue[list[int] | None] = queue.SimpleQueue()
    completed = [0]

    def completer() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            while (ids := pending.get()) is not None:
                conn.execute(queries.complete_jobs, {"ids": ids, "pool_id": POOL_ID})
                completed[0] += len(ids)

    thread = threading.Thread(target=completer)
    thread.start()
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            params = {
                "task_ids": _task_ids(conn),
                "forbidden_flags": None,
                "batch": batch,
                "now": None,
            }
            params["pool_id"] = POOL_ID
            while rows := conn.execute(queries.get_jobs, params).fetchall():
                pending.put([row[0] for row in rows])
    finally:
        pending.put(None)
        thread.join()
    return completed[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--jobs", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    queries = Queries("graphile_worker")
    print(f"ceiling: {args.jobs} jobs, claim batch {args.batch}, {args.rounds} rounds")
    with scratch_database(server_url()) as url:
        results: dict[str, list[float]] = {"serial": [], "overlapped": []}
        for index in range(args.rounds):
            names = list(results) if index % 2 == 0 else list(results)[::-1]
            for name in names:
                fresh_jobs_table(url)
                enqueue_noop_jobs(url, args.jobs)
                loop = serial if name == "serial" else overlapped
                started = time.perf_counter()
                done = loop(url, args.batch, queries)
                seconds = time.perf_counter() - started
                assert done == args.jobs, (name, done)
                results[name].append(seconds)
        for name, walls in results.items():
            best, median = summary(walls)
            print(
                f"  {name}: best {args.jobs / best:,.0f} jobs/s, "
                f"median {args.jobs / median:,.0f} jobs/s"
            )


if __name__ == "__main__":
    main()
