"""What the Prometheus metrics cost: drain no-op jobs with and without them, in turns.

Usage: ``python tools/bench_metrics.py [-n JOBS] [--rounds R] [-j N] [--local-queue-size N]``.
Each round enqueues JOBS no-op jobs and drains them with ``run_once`` twice,
once plain and once with a ``kongtask.ops.metrics.Metrics`` attached (which makes
the Runner deliver its job events to the counters and histograms), and
prints the drain rate of each and their ratio; the median ratio is the
figure to quote.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_common import scratch_database, server_url

import kongtask
from kongtask.ops.metrics import Metrics


def noop(payload: Any, helpers: Any) -> None:
    pass


def drain(url: str, jobs: int, concurrency: int, metrics: bool, local_queue_size: int) -> float:
    """Enqueue ``jobs`` jobs, drain them, return jobs per second of the drain."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "select count(*) from graphile_worker.add_jobs(array(select "
            "json_populate_recordset(null::graphile_worker.job_spec, %s::json)))",
            (json.dumps([{"identifier": "noop"}] * jobs),),
        )
    runner = kongtask.Runner(
        tasks={"noop": noop},
        connection_string=url,
        concurrency=concurrency,
        local_queue_size=local_queue_size,
        once=True,
        install_signal_handlers=False,
    )
    attached = Metrics() if metrics else None
    if attached is not None:
        attached.attach(runner)
    started = time.perf_counter()
    runner.start()
    runner.wait()
    elapsed = time.perf_counter() - started
    if attached is not None:
        counted = sum(
            sample.value
            for family in attached.registry.collect()
            if family.name == "kongtask_jobs_succeeded"
            for sample in family.samples
            if sample.name.endswith("_total")
        )
        assert counted == jobs, f"counted {counted} of {jobs}"
        attached.detach()
    return jobs / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--jobs", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("-j", "--concurrency", type=int, default=24)
    parser.add_argument("--local-queue-size", type=int, default=500)
    args = parser.parse_args(argv)
    ratios, plain_rates, metric_rates = [], [], []
    with scratch_database(server_url()) as url:
        drain(url, 1000, args.concurrency, False, args.local_queue_size)  # warm-up
        for round_ in range(args.rounds):
            plain = drain(url, args.jobs, args.concurrency, False, args.local_queue_size)
            measured = drain(url, args.jobs, args.concurrency, True, args.local_queue_size)
            plain_rates.append(plain)
            metric_rates.append(measured)
            ratios.append(measured / plain)
            print(
                f"round {round_ + 1}: plain {plain:,.0f} jobs/s, with metrics "
                f"{measured:,.0f} jobs/s, ratio {measured / plain:.3f}"
            )
    print(
        f"median: plain {statistics.median(plain_rates):,.0f} jobs/s, with metrics "
        f"{statistics.median(metric_rates):,.0f} jobs/s, ratio {statistics.median(ratios):.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
