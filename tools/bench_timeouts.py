"""Timeout benchmark: what a timeout costs a plain job, and how fast a hung slot is refilled.

Usage: ``python tools/bench_timeouts.py [-n 20000] [-j 4] [--rounds 3] [--hangs 10]``.

Drain: N no-op jobs are drained in this process by ``kongtask.run_once`` with
no timeout and with a worker timeout of 60 s (every job then runs under the
watchdog), alternating which goes first; best / median jobs/s are printed.

Refill: a worker with ``-j 1`` runs a handler that ignores its abort event
and has a 0.5 s timeout, then a no-op job queued behind it; the figure is the
time from the hung handler's deadline (its start + 0.5 s) to the no-op
handler's start, over ``--hangs`` hung jobs (their threads stay stuck until
the end).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kongtask
from tools._bench_common import (
    enqueue_noop_jobs,
    fresh_jobs_table,
    percentile,
    scratch_database,
    server_url,
    summary,
)


def _noop(payload: Any, helpers: Any) -> None:
    return None


def drain(url: str, count: int, concurrency: int, timeout_s: float | None) -> float:
    """Jobs per second draining ``count`` no-op jobs with ``run_once`` (start-up included)."""
    fresh_jobs_table(url)
    enqueue_noop_jobs(url, count)
    started = time.perf_counter()
    kongtask.run_once(
        tasks={"noop": _noop},
        connection_string=url,
        concurrency=concurrency,
        local_queue_size=500,
        max_pool_size=max(10, concurrency + 2),
        timeout_s=timeout_s,
        install_signal_handlers=False,
    )
    return count / (time.perf_counter() - started)


def refill(url: str, hangs: int) -> list[float]:
    """Seconds from each hung job's deadline to the start of the job queued behind it."""
    fresh_jobs_table(url)
    release = threading.Event()
    started = threading.Event()
    deadlines: list[float] = []
    gaps: list[float] = []

    @kongtask.task(timeout_s=0.5)
    def hang(payload: Any, helpers: Any) -> None:
        deadlines.append(time.monotonic() + 0.5)
        release.wait(600)

    def after(payload: Any, helpers: Any) -> None:
        gaps.append(time.monotonic() - deadlines[-1])
        started.set()

    runner = kongtask.Runner(
        tasks={"hang": hang, "after": after},
        connection_string=url,
        concurrency=1,
        install_signal_handlers=False,
    )
    with runner:
        for _ in range(hangs):
            started.clear()
            runner.add_job("hang", {}, max_attempts=1)
            runner.add_job("after", {}, priority=1)
            if not started.wait(30):
                raise SystemExit("the job behind a hung one never started")
        load = runner.load()
        print(f"stuck threads at the end: {load.stuck_threads if load else '?'}")
        release.set()
    return gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--jobs", type=int, default=20_000)
    parser.add_argument("-j", "--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hangs", type=int, default=10)
    args = parser.parse_args()
    print(
        f"settings: {args.jobs} no-op jobs, -j {args.concurrency}, local queue 500, "
        f"{args.rounds} rounds; refill: -j 1, timeout 0.5 s, {args.hangs} hung jobs"
    )
    with scratch_database(server_url()) as url:
        rates: dict[str, list[float]] = {"no timeout": [], "timeout 60 s": []}
        for round_number in range(args.rounds):
            order = [None, 60.0] if round_number % 2 == 0 else [60.0, None]
            for timeout_s in order:
                name = "no timeout" if timeout_s is None else "timeout 60 s"
                rates[name].append(drain(url, args.jobs, args.concurrency, timeout_s))
        for name, values in rates.items():
            best, median = max(values), summary(values)[1]
            print(f"drain, {name}: {best:,.0f} / {median:,.0f} jobs/s (best / median)")
        gaps = sorted(refill(url, args.hangs))
        print(
            "hung job's deadline -> next job start at -j 1: "
            f"p50 {percentile(gaps, 0.5) * 1000:.1f} ms, max {gaps[-1] * 1000:.1f} ms"
        )


if __name__ == "__main__":
    main()
