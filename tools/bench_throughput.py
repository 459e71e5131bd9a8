"""Throughput benchmark: enqueue N no-op jobs in one statement, then drain them.

Usage: ``python tools/bench_throughput.py [-n 100000] [-j 24] [--local-queue-size 500]
[--compare-graphile-worker]``. Creates a scratch database on ``KONGTASK_BENCH_URL``
(or ``DATABASE_URL``, else postgresql://postgres@127.0.0.1:5432/postgres), drops it
afterwards. The drain runs ``kongtask.run_once`` in a subprocess (timed from
spawn to exit, so start-up counts) and reports jobs/s and the worker's peak RSS;
with ``--compare-graphile-worker`` graphile-worker 0.17.3 (its perfTest settings:
concurrency 24, localQueue 500, batch delays 0) drains the same N on the same
database, and the ratio is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools._bench_common import graphile_worker_dir, scratch_database, server_url, to_uri

ENQUEUE = """
select count(*) from graphile_worker.add_jobs(array(
    select json_populate_recordset(null::graphile_worker.job_spec, %s::json)
))
"""

DRAIN = """
import sys, time
from kongtask.runner import run_once
def noop(payload, helpers):
    pass
started = time.perf_counter()
run_once(tasks={"noop": noop}, connection_string=sys.argv[1], concurrency=int(sys.argv[2]),
         local_queue_size=int(sys.argv[3]), max_pool_size=int(sys.argv[2]) + 1,
         install_signal_handlers=False)
print(time.perf_counter() - started)
"""

GW_CONFIG = """
module.exports = {
  worker: {
    concurrentJobs: %(concurrency)d,
    maxPoolSize: %(pool)d,
    localQueue: { size: %(local_queue)d, refetchDelay: { durationMs: 10 } },
    completeJobBatchDelay: 0,
    failJobBatchDelay: 0,
    gracefulShutdownAbortTimeout: 2500,
  },
};
"""


def enqueue(url: str, count: int) -> float:
    specs = json.dumps([{"identifier": "noop", "payload": {"id": i}} for i in range(count)])
    with psycopg.connect(url, autocommit=True) as conn:
        started = time.perf_counter()
        conn.execute(ENQUEUE, (specs,))
        return time.perf_counter() - started


def remaining(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("select count(*) from graphile_worker._private_jobs").fetchone()
        return int(row[0]) if row else -1


def timed_child(
    argv: list[str], *, cwd: str | None = None, env: dict[str, str] | None = None
) -> tuple[float, float, str]:
    """Run a child; returns (wall seconds, peak RSS in MB, stdout)."""
    started = time.perf_counter()
    child = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if child.returncode != 0:
        raise SystemExit(f"{argv[0]} exited with {child.returncode}")
    return wall, usage.ru_maxrss / 1024, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--jobs", type=int, default=100_000)
    parser.add_argument("-j", "--concurrency", type=int, default=24)
    parser.add_argument("--local-queue-size", type=int, default=500)
    parser.add_argument("--compare-graphile-worker", action="store_true")
    args = parser.parse_args()
    env = dict(os.environ, NO_LOG_SUCCESS="1")
    with scratch_database(server_url()) as url:
        seconds = enqueue(url, args.jobs)
        print(
            f"enqueue (kongtask schema, one add_jobs call): {args.jobs} jobs in {seconds:.3f}s "
            f"= {args.jobs / seconds:,.0f} jobs/s"
        )
        wall, rss, out = timed_child(
            [sys.executable, "-c", DRAIN, url, str(args.concurrency), str(args.local_queue_size)],
            env=env,
        )
        left = remaining(url)
        ours = args.jobs / wall
        print(
            f"kongtask run_once -j {args.concurrency} (local queue {args.local_queue_size}): "
            f"{wall:.2f}s wall ({float(out):.2f}s in run_once) = {ours:,.0f} jobs/s, "
            f"peak RSS {rss:.0f} MB, {left} left"
        )
        if not args.compare_graphile_worker:
            return
        gw = graphile_worker_dir()
        with tempfile.TemporaryDirectory(prefix="kongtask-bench-gw-") as cwd:
            Path(cwd, "tasks").mkdir()
            Path(cwd, "tasks", "noop.js").write_text("module.exports = async () => {};\n")
            Path(cwd, "graphile.config.js").write_text(
                GW_CONFIG
                % {
                    "concurrency": args.concurrency,
                    "pool": args.concurrency + 1,
                    "local_queue": args.local_queue_size,
                }
            )
            os.symlink(gw / "node_modules", Path(cwd, "node_modules"))
            seconds = enqueue(url, args.jobs)
            print(f"enqueue again for graphile-worker: {args.jobs / seconds:,.0f} jobs/s")
            cli = str(gw / "node_modules" / "graphile-worker" / "dist" / "cli.js")
            gw_env = dict(env, DATABASE_URL=to_uri(url))
            wall, rss, _ = timed_child(["node", cli, "--once"], cwd=cwd, env=gw_env)
            left = remaining(url)
            theirs = args.jobs / wall
            print(
                f"graphile-worker {gw.name} --once: {wall:.2f}s wall = {theirs:,.0f} jobs/s, "
                f"peak RSS {rss:.0f} MB, {left} left"
            )
            print(f"ratio kongtask / graphile-worker: {ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
