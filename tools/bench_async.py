"""Async handlers against plain ones: 1 ms of waiting per job at the same concurrency.

Usage: ``python tools/bench_async.py [-n 10000] [-j 100] [--sleep-ms 1] [--rounds 3]``.

Creates a scratch database on ``KONGTASK_BENCH_URL`` (or ``DATABASE_URL``, else
postgresql://postgres@127.0.0.1:5432/postgres) and drops it afterwards. Each
round empties the jobs table, adds N jobs and drains them with a run-once
Runner in a fresh child process, once with ``async def`` handlers doing
``await asyncio.sleep(0.001)`` and once with plain handlers doing
``time.sleep(0.001)`` (``--sleep-ms`` changes the wait); rounds alternate
which goes first. The child times
the drain from ``start()`` to the end of the run and samples
``threading.active_count()`` every 5 ms; peak RSS is the child's ``ru_maxrss``.
Min and median of jobs/s, and the max of peak threads and RSS, are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools._bench_common import (
    enqueue_noop_jobs,
    fresh_jobs_table,
    scratch_database,
    server_url,
    summary,
)

KINDS = ("async", "sync")


def child(url: str, kind: str, concurrency: int, count: int, wait_s: float) -> None:
    """Drain the jobs with one kind of handler; print one JSON line of figures."""
    from kongtask.runner import Runner

    async def async_wait(payload: Any, helpers: Any) -> None:
        await asyncio.sleep(wait_s)

    def sync_wait(payload: Any, helpers: Any) -> None:
        time.sleep(wait_s)

    handler: Any = async_wait if kind == "async" else sync_wait
    peak = threading.active_count()
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.005):
            peak = max(peak, threading.active_count())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    runner = Runner(
        tasks={"noop": handler},
        connection_string=url,
        concurrency=concurrency,
        once=True,
        install_signal_handlers=False,
    )
    started = time.perf_counter()
    runner.start()
    runner.wait()
    elapsed = time.perf_counter() - started
    stop.set()
    sampler.join()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # The sampler itself is one of the threads counted; leave it out.
    figures = {"jobs_s": count / elapsed, "seconds": elapsed, "threads": peak - 1, "rss_mb": rss_mb}
    print(json.dumps(figures))


def one_round(
    url: str, kind: str, concurrency: int, count: int, sleep_ms: float
) -> dict[str, float]:
    fresh_jobs_table(url)
    enqueue_noop_jobs(url, count)
    command = [sys.executable, __file__, "--child", kind, "--url", url]
    out = subprocess.run(
        [*command, "-j", str(concurrency), "-n", str(count), "--sleep-ms", str(sleep_ms)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    figures: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=10_000, help="jobs per drain")
    parser.add_argument("-j", type=int, default=100, help="concurrency")
    parser.add_argument("--sleep-ms", type=float, default=1.0, help="each handler's wait")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.url, args.child, args.j, args.n, args.sleep_ms / 1000)
        return
    print(
        f"settings: {args.n} jobs per drain, concurrency {args.j}, {args.rounds} rounds "
        f"(alternated), run-once Runner in a fresh process, handler waits {args.sleep_ms:g} ms "
        "(async: await asyncio.sleep; sync: time.sleep)"
    )
    results: dict[str, list[dict[str, float]]] = {kind: [] for kind in KINDS}
    with scratch_database(server_url()) as url:
        for index in range(args.rounds):
            order = KINDS if index % 2 == 0 else tuple(reversed(KINDS))
            for kind in order:
                figures = one_round(url, kind, args.j, args.n, args.sleep_ms)
                results[kind].append(figures)
                print(
                    f"  round {index + 1} {kind:5}: {figures['jobs_s']:8.0f} jobs/s "
                    f"({figures['seconds']:.2f} s), "
                    f"peak threads {figures['threads']:.0f}, peak RSS {figures['rss_mb']:.0f} MB",
                    flush=True,
                )
    for kind in KINDS:
        low, median = summary([r["jobs_s"] for r in results[kind]])
        threads = max(r["threads"] for r in results[kind])
        rss = max(r["rss_mb"] for r in results[kind])
        print(
            f"{kind:5}: jobs/s min {low:.0f} median {median:.0f}; "
            f"peak threads {threads:.0f}; peak RSS {rss:.0f} MB"
        )


if __name__ == "__main__":
    main()
