"""What naming a job by its declared task costs against naming it by string.

Usage: ``python tools/bench_declared.py [-n 2000] [--rounds 3]``. On a scratch
database it times, per round: building ``n`` job specs (``JobSpec("name")``
against ``task.spec()`` with three declared defaults), ``n`` sequential
``kongtask.add_job(connection=...)`` calls by name and by declared task and
``n`` ``task.defer(connection=...)`` calls (one autocommit connection; the
three alternate in blocks of 100),
and 50 ``task.defer()`` calls without one (each opens, migrate-checks and
closes its own connection). Best and median of the rounds are printed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kongtask
from kongtask import JobSpec, WorkerUtils
from tools._bench_common import fresh_jobs_table, scratch_database, server_url, summary

ALONE = 50


@kongtask.task(queue="reports", priority=5, max_attempts=3)
def build_report(payload: Any, helpers: Any) -> None:
    """The declared task the jobs are made for."""


def per_call_us(count: int, call: Callable[[int], object]) -> float:
    """Microseconds per call of ``call(i)`` over ``count`` calls."""
    started = time.perf_counter()
    for i in range(count):
        call(i)
    return (time.perf_counter() - started) / count * 1e6


def interleaved_us(count: int, calls: dict[str, Callable[[int], object]]) -> dict[str, float]:
    """Microseconds per call of each of ``calls``, timed in alternating blocks of
    100 so that a change of load on the machine weighs on all of them alike."""
    spent = dict.fromkeys(calls, 0.0)
    for block in range(0, count, 100):
        for name, call in calls.items():
            started = time.perf_counter()
            for i in range(block, min(block + 100, count)):
                call(i)
            spent[name] += time.perf_counter() - started
    return {name: total / count * 1e6 for name, total in spent.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="calls per measure (default 2000)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    n: int = args.n
    print(f"settings: n={n} rounds={args.rounds} defer-alone calls={ALONE} server={server_url()}")
    results: dict[str, list[float]] = {}
    with scratch_database(server_url()) as url, WorkerUtils(url) as utils:
        for _ in range(args.rounds):
            fresh_jobs_table(url)
            specs: dict[str, Callable[[int], object]] = {
                "JobSpec by name": lambda i: JobSpec(
                    "build_report", {"n": i}, queue_name="reports", priority=5, max_attempts=3
                ),
                "task.spec()": lambda i: build_report.spec({"n": i}),
            }
            with utils.connection() as conn:
                enqueues: dict[str, Callable[[int], object]] = {
                    "add_job on conn by name": lambda i: kongtask.add_job(
                        "build_report",
                        {"n": i},
                        connection=conn,
                        queue_name="reports",
                        priority=5,
                        max_attempts=3,
                    ),
                    "add_job on conn by task": lambda i: kongtask.add_job(
                        build_report, {"n": i}, connection=conn
                    ),
                    "task.defer(connection=conn)": lambda i: build_report.defer(
                        {"n": i}, connection=conn
                    ),
                }
                timed = {**interleaved_us(n, specs), **interleaved_us(n, enqueues)}
            for name, value in timed.items():
                results.setdefault(name, []).append(value)
            results.setdefault("task.defer() on its own connection", []).append(
                per_call_us(ALONE, lambda i: build_report.defer({"n": i}, connection_string=url))
            )
    print(f"{'measure':40} {'best us/call':>13} {'median us/call':>15}")
    for name, values in results.items():
        best, median = summary(values)
        print(f"{name:40} {best:13.1f} {median:15.1f}")


if __name__ == "__main__":
    main()
