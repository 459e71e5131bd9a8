"""Cron benchmarks: a big minute, the matcher's CPU per tick, and a week of backfill.

    python tools/bench_cron.py [--url URL] [--items 10000] [--backfill-items 100]

Prints:
- the time from a minute boundary to all jobs of 10,000 due items committed
  (the clock is a ManualClock, so the boundary is exact and nothing sleeps);
- CronIndex CPU per tick for the same crontab (mean and worst over a day);
- the time to backfill one week for 100 ``* * * * *`` items with ``fill=1w``.

Each run uses a scratch database on ``--url`` (default ``KONGTASK_BENCH_URL``,
``DATABASE_URL`` or the local server) that it drops afterwards.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kongtask.cron import CronIndex, parse_crontab
from kongtask.cron.service.cron_service import CronService
from kongtask.cron.source import CrontabSource
from kongtask.db.statements import Queries
from kongtask.testing import ManualClock
from tools._bench_common import scratch_database, server_url

START = datetime(2021, 1, 4, 0, 0, 30, tzinfo=UTC)


class Waiter:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.seen: dict[str, int] = {}
        self.stamps: dict[str, float] = {}

    def __call__(self, signal: Any, **payload: Any) -> None:
        with self.cond:
            self.seen[signal.name] = self.seen.get(signal.name, 0) + 1
            self.stamps[signal.name] = time.perf_counter()
            self.cond.notify_all()

    def wait(self, name: str, count: int = 1, timeout_s: float = 600.0) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.seen.get(name, 0) >= count, timeout_s):
                raise TimeoutError(f"{name} x{count} not seen")


def service(conninfo: str, text: str, clock: ManualClock, emit: Waiter) -> CronService:
    return CronService(
        source=CrontabSource(text=text),
        clock=clock,
        connect=lambda: psycopg.connect(conninfo, autocommit=True),
        queries=Queries("graphile_worker"),
        emit=emit,
    )


def count_jobs(conninfo: str) -> int:
    with psycopg.connect(conninfo) as conn:
        row = conn.execute("select count(*) from graphile_worker._private_jobs").fetchone()
        return int(row[0]) if row else 0


def big_minute(url: str, items: int) -> None:
    text = "\n".join(f"* * * * * task_{n % 50} ?id=item_{n}" for n in range(items))
    with scratch_database(url) as conninfo:
        clock, waiter = ManualClock(START), Waiter()
        cron = service(conninfo, text, clock, waiter)
        cron.start()
        try:
            waiter.wait("cron:started")
            clock.wait_for_timers(1)
            boundary = time.perf_counter()
            clock.advance(30.002)  # to the minute boundary (timers fire 1 ms after it)
            waiter.wait("cron:scheduled")
            elapsed = waiter.stamps["cron:scheduled"] - boundary
        finally:
            cron.stop()
        jobs = count_jobs(conninfo)
    print(f"big minute: {items} items due -> {jobs} jobs committed in {elapsed * 1000:.0f} ms")


def matcher_cpu(items: int) -> None:
    text = "\n".join(
        f"{n % 60} {'*' if n % 3 else n % 24} * * {'*' if n % 5 else '1-5'} t ?id=i{n}"
        for n in range(items)
    )
    index = CronIndex(parse_crontab(text))
    samples = []
    minute = datetime(2021, 1, 4, tzinfo=UTC)
    for _ in range(24 * 60):
        began = time.process_time()
        index.due(minute)
        samples.append(time.process_time() - began)
        minute += timedelta(minutes=1)
    mean = sum(samples) / len(samples)
    print(
        f"matcher CPU per tick ({items} items, one day of ticks): "
        f"mean {mean * 1000:.3f} ms, worst {max(samples) * 1000:.3f} ms"
    )


def backfill_week(url: str, items: int) -> None:
    text = "\n".join(f"* * * * * task ?id=every_{n}&fill=1w" for n in range(items))
    with scratch_database(url) as conninfo:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            known_since = START - timedelta(weeks=2)
            conn.execute(
                "insert into graphile_worker._private_known_crontabs (identifier, known_since) "
                "select 'every_' || n, %s from generate_series(0, %s - 1) as n",
                (known_since, items),
            )
        clock, waiter = ManualClock(START), Waiter()
        cron = service(conninfo, text, clock, waiter)
        began = time.perf_counter()
        cron.start()
        try:
            waiter.wait("cron:started")
            elapsed = time.perf_counter() - began
        finally:
            cron.stop()
        jobs = count_jobs(conninfo)
    print(
        f"backfill one week: {items} items x 10080 minutes -> {jobs} jobs "
        f"in {elapsed:.1f} s ({jobs / elapsed:,.0f} jobs/s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=server_url(), help="server for scratch databases")
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--backfill-items", type=int, default=100)
    parser.add_argument("--skip-backfill", action="store_true")
    args = parser.parse_args()
    matcher_cpu(args.items)
    big_minute(args.url, args.items)
    if not args.skip_backfill:
        backfill_week(args.url, args.backfill_items)


if __name__ == "__main__":
    main()
