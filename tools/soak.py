"""Soak: push many jobs through several kongtask processes and watch rate, memory and the ledger.

Creates a scratch database on the server, enqueues ``--jobs`` ledger jobs
(handlers fail at random on their first two attempts), starts ``--processes``
``kongtask -j CONCURRENCY`` workers, samples throughput and each process's RSS
every few seconds, then checks the ledger: every job completed exactly once,
nothing lost, nothing left locked. Memory must not grow after warm-up (the
first fifth of the run).

    python tools/soak.py --jobs 1000000            # or KONGTASK_SOAK_JOBS=...
    KONGTASK_SOAK=1 pytest -m soak -s              # the same, as a test
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kongtask.db.migrate import migrate  # noqa: E402
from tests.faults.ledger import (  # noqa: E402
    WorkerProcess,
    check_ledger,
    enqueue,
    install_ledger,
    make_specs,
    scalar,
    write_tasks,
)

logger = logging.getLogger("kongtask.soak")

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/test"
WARM_UP_FRACTION = 0.2


@dataclass
class Sample:
    """One observation: seconds since start, jobs completed, jobs/s since the last one, RSS."""

    at_s: float
    completed: int
    rate: float
    rss_mb: list[float]


@dataclass
class SoakResult:
    """What a soak run measured."""

    jobs: int
    processes: int
    concurrency: int
    fail_rate: float
    enqueue_s: float
    run_s: float
    jobs_per_s: float
    #: Rate until 98 % were done, before the retry back-off tail (e^1, e^2 s) dominates.
    first_98_percent_s: float = 0.0
    jobs_per_s_first_98: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    peak_rss_mb: list[float] = field(default_factory=list)
    rss_after_warm_up_mb: list[float] = field(default_factory=list)
    rss_growth_mb: list[float] = field(default_factory=list)
    ledger: str = ""
    clean: bool = False
    failed_executions: int = 0
    repeated: int = 0

    def table(self) -> str:
        """The samples as a Markdown table."""
        lines = [
            "| t (s) | completed | jobs/s | RSS per process (MB) |",
            "| --- | --- | --- | --- |",
        ]
        for s in self.samples:
            rss = ", ".join(f"{value:.0f}" for value in s.rss_mb)
            lines.append(f"| {s.at_s:.0f} | {s.completed} | {s.rate:.0f} | {rss} |")
        return "\n".join(lines)


def _rss_mb(pid: int) -> float:
    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.NoSuchProcess:
        return 0.0


def run_soak(
    server: str,
    *,
    jobs: int,
    processes: int = 4,
    concurrency: int = 24,
    fail_rate: float = 0.02,
    sample_s: float = 5.0,
    timeout_s: float = 4 * 3600.0,
    keep: bool = False,
) -> SoakResult:
    """Run one soak against a scratch database on ``server``; returns the measurements."""
    name = f"soak_scratch_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    db_url = make_conninfo(server, dbname=name)
    workers: list[WorkerProcess] = []
    folder = Path(tempfile.mkdtemp(prefix="kongtask-soak-"))
    try:
        with psycopg.connect(db_url, autocommit=True) as db:
            migrate(db, "graphile_worker")
            install_ledger(db)
            tasks = write_tasks(folder)
            started = time.monotonic()
            enqueue(
                db,
                make_specs(jobs, queues=8, queued_every=100, fail_p=fail_rate, fail_until=2),
                chunk=10_000,
            )
            enqueue_s = time.monotonic() - started
            logger.info("enqueued %d jobs in %.1fs", jobs, enqueue_s)
            env = {"KONGTASK_LEDGER_VIA": "pool", "NO_LOG_SUCCESS": "1"}
            workers = [
                WorkerProcess.cli(
                    db_url,
                    tasks,
                    folder / f"worker{i}.log",
                    jobs=concurrency,
                    poll_ms=1000,
                    env=env,
                )
                for i in range(processes)
            ]
            for worker in workers:
                worker.wait_ready(60)
            result = SoakResult(
                jobs=jobs,
                processes=processes,
                concurrency=concurrency,
                fail_rate=fail_rate,
                enqueue_s=enqueue_s,
                run_s=0.0,
                jobs_per_s=0.0,
            )
            begin = last_at = time.monotonic()
            last_done = 0
            pause = threading.Event()
            deadline = begin + timeout_s
            while True:
                pause.wait(sample_s)
                now = time.monotonic()
                done = scalar(db, "select count(*) from public.completions")
                rss = [_rss_mb(worker.pid) for worker in workers]
                sample = Sample(now - begin, done, (done - last_done) / (now - last_at), rss)
                result.samples.append(sample)
                logger.info(
                    "t=%.0fs completed=%d rate=%.0f/s rss=%s",
                    sample.at_s,
                    done,
                    sample.rate,
                    ", ".join(f"{value:.0f}" for value in rss),
                )
                last_done, last_at = done, now
                for worker in workers:
                    if worker.proc.poll() is not None:
                        raise RuntimeError(f"worker {worker.pid} exited:\n{worker.log()[-2000:]}")
                if done >= jobs:
                    break
                if now > deadline:
                    raise TimeoutError(f"soak not finished after {timeout_s}s ({done} done)")
            result.run_s = time.monotonic() - begin
            target = jobs * 0.98
            result.first_98_percent_s = next(
                sample.at_s for sample in result.samples if sample.completed >= target
            )
            result.jobs_per_s_first_98 = target / result.first_98_percent_s
            result.jobs_per_s = jobs / result.run_s
            for worker in workers:
                worker.send(signal.SIGTERM)
            for worker in workers:
                worker.wait(60)
            report = check_ledger(db, range(jobs))
            result.ledger = report.summary()
            result.failed_executions = report.failed_executions
            result.repeated = len(report.repeated)
            try:
                report.assert_clean()
                result.clean = True
            except AssertionError as error:
                logger.error("ledger check failed: %s", error)
        _summarise_memory(result)
        return result
    finally:
        for worker in workers:
            worker.close()
        if not keep:
            with psycopg.connect(server, autocommit=True) as admin:
                admin.execute(
                    sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name))
                )


def _summarise_memory(result: SoakResult) -> None:
    samples = result.samples
    if not samples:
        return
    count = len(samples[0].rss_mb)
    warm = max(1, int(len(samples) * WARM_UP_FRACTION))
    # The last sample can be taken while processes drain; all samples count.
    result.peak_rss_mb = [max(s.rss_mb[i] for s in samples) for i in range(count)]
    result.rss_after_warm_up_mb = [samples[warm - 1].rss_mb[i] for i in range(count)]
    result.rss_growth_mb = [
        max(s.rss_mb[i] for s in samples[warm - 1 :]) - result.rss_after_warm_up_mb[i]
        for i in range(count)
    ]


def main(argv: list[str] | None = None) -> int:
    """Command line: run a soak and print the measurements (and JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--server",
        default=os.environ.get("KONGTASK_TEST_DATABASE_URL", DEFAULT_SERVER),
        help="a connection string to the server (a scratch database is created on it)",
    )
    parser.add_argument(
        "--jobs", type=int, default=int(os.environ.get("KONGTASK_SOAK_JOBS", "1000000"))
    )
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--fail-rate", type=float, default=0.02)
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    parser.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result = run_soak(
        args.server,
        jobs=args.jobs,
        processes=args.processes,
        concurrency=args.concurrency,
        fail_rate=args.fail_rate,
        sample_s=args.sample_s,
        keep=args.keep,
    )
    print(result.table())
    print(
        f"\n{result.jobs} jobs, {result.processes} x {result.concurrency}: "
        f"{result.run_s:.1f}s, {result.jobs_per_s:.0f} jobs/s overall, "
        f"{result.jobs_per_s_first_98:.0f} jobs/s to 98% (enqueue {result.enqueue_s:.1f}s)"
    )
    print(f"peak RSS (MB): {', '.join(f'{v:.0f}' for v in result.peak_rss_mb)}")
    print(f"RSS growth after warm-up (MB): {', '.join(f'{v:.1f}' for v in result.rss_growth_mb)}")
    print(f"ledger: {result.ledger}")
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(result), indent=2))
    return 0 if result.clean else 1


if __name__ == "__main__":
    sys.exit(main())
