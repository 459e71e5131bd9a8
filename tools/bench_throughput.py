"""Throughput benchmark: enqueue N no-op jobs in one call, then drain them with the CLI.

Usage: ``python tools/bench_throughput.py [-n 100000] [-j 24] [--local-queue-size 500]
[--compare-graphile-worker]``. Creates a scratch database on ``KONGTASK_BENCH_URL``
(or ``DATABASE_URL``, else postgresql://postgres@127.0.0.1:5432/postgres), drops it
afterwards. Enqueueing is timed twice: through ``WorkerUtils.add_jobs`` (what a
user calls) and through the schema's ``add_jobs`` SQL function. The drain runs
the real ``kongtask -c URL --tasks noop.py --once -j 24`` in a subprocess (timed
from spawn to exit, so start-up counts) and reports jobs/s and the worker's peak
RSS; with ``--compare-graphile-worker`` graphile-worker 0.17.3 enqueues the same
N through ``addJobs`` and (with its perfTest settings: concurrency 24,
localQueue 500, batch delays 0) drains them on the same database, and the
ratios are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
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

NOOP_TASKS = """
def noop(payload, helpers):
    pass
"""

GW_ADD_JOBS = """
const { makeWorkerUtils } = require("graphile-worker");
async function main() {
  const count = Number(process.argv[2]);
  const specs = [];
  for (let i = 0; i < count; i++) specs.push({ identifier: "noop", payload: { id: i } });
  const utils = await makeWorkerUtils({ connectionString: process.env.DATABASE_URL });
  try {
    const started = process.hrtime.bigint();
    await utils.addJobs(specs);
    console.log(Number(process.hrtime.bigint() - started) / 1e9);
  } finally {
    await utils.release();
  }
}
main().catch((e) => { console.error(e); process.exit(1); });
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


def enqueue_sql(url: str, count: int) -> float:
    """Seconds for one ``add_jobs`` SQL call (the JSON is encoded beforehand)."""
    specs = json.dumps([{"identifier": "noop", "payload": {"id": i}} for i in range(count)])
    with psycopg.connect(url, autocommit=True) as conn:
        started = time.perf_counter()
        conn.execute(ENQUEUE, (specs,))
        return time.perf_counter() - started


def enqueue_worker_utils(url: str, count: int) -> float:
    """Seconds for one ``WorkerUtils.add_jobs`` call (connection already open)."""
    from kongtask import WorkerUtils

    specs = [{"identifier": "noop", "payload": {"id": i}} for i in range(count)]
    with WorkerUtils(url) as utils:
        started = time.perf_counter()
        added = utils.add_jobs(specs)
        seconds = time.perf_counter() - started
    assert len(added) == count
    return seconds


def enqueue_graphile_worker(url: str, count: int, gw: Path) -> float:
    """Seconds for one graphile-worker ``addJobs`` call (timed inside Node)."""
    with tempfile.TemporaryDirectory(prefix="kongtask-bench-gw-") as cwd:
        os.symlink(gw / "node_modules", Path(cwd, "node_modules"))
        Path(cwd, "add_jobs.js").write_text(GW_ADD_JOBS)
        out = subprocess.run(
            ["node", "add_jobs.js", str(count)],
            cwd=cwd,
            env=dict(os.environ, DATABASE_URL=to_uri(url)),
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    return float(out.strip().splitlines()[-1])


def clear_jobs(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("truncate graphile_worker._private_jobs")


def kongtask_cli() -> list[str]:
    """The installed ``kongtask`` console script, else ``python -m kongtask``."""
    script = Path(sys.executable).with_name("kongtask")
    return [str(script)] if script.exists() else [sys.executable, "-m", "kongtask"]


def remaining(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("select count(*) from graphile_worker._private_jobs").fetchone()
        return int(row[0]) if row else -1


def _peak_rss_kb(pid: int) -> int | None:
    """The process's resident-set high-water mark (``VmHWM``), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def timed_child(
    argv: list[str], *, cwd: str | None = None, env: dict[str, str] | None = None
) -> tuple[float, float, str]:
    """Run a child; returns (wall seconds, peak RSS in MB, stdout).

    The peak comes from ``/proc/PID/status`` (``VmHWM``, sampled every 10 ms
    while the child runs): ``getrusage``'s ``ru_maxrss`` would also count the
    memory of this (large) parent that the child had between fork and exec.
    """
    started = time.perf_counter()
    child = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, text=True)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            value = _peak_rss_kb(child.pid)
            if value is not None:
                peak[0] = max(peak[0], value)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    assert child.stdout is not None
    out = child.stdout.read()
    # Take a last sample just before reaping (the process is a zombie-to-be, not gone yet).
    last = _peak_rss_kb(child.pid)
    if last is not None:
        peak[0] = max(peak[0], last)
    child.wait()
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    if child.returncode != 0:
        raise SystemExit(f"{argv[0]} exited with {child.returncode}")
    return wall, peak[0] / 1024, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--jobs", type=int, default=100_000)
    parser.add_argument("-j", "--concurrency", type=int, default=24)
    parser.add_argument("--local-queue-size", type=int, default=500)
    parser.add_argument("--compare-graphile-worker", action="store_true")
    args = parser.parse_args()
    n = args.jobs
    env = dict(os.environ, NO_LOG_SUCCESS="1")
    gw = graphile_worker_dir() if args.compare_graphile_worker else None
    with scratch_database(server_url()) as url, tempfile.TemporaryDirectory() as tmp:
        sql_s = enqueue_sql(url, n)
        print(f"enqueue, add_jobs SQL function: {n} jobs in {sql_s:.3f}s = {n / sql_s:,.0f} jobs/s")
        clear_jobs(url)
        utils_s = enqueue_worker_utils(url, n)
        print(
            f"enqueue, WorkerUtils.add_jobs: {n} jobs in {utils_s:.3f}s = {n / utils_s:,.0f} jobs/s"
        )
        tasks_file = Path(tmp, "noop_tasks.py")
        tasks_file.write_text(NOOP_TASKS)
        argv = [*kongtask_cli(), "-c", url, "--tasks", str(tasks_file), "--once"]
        argv += ["-j", str(args.concurrency), "--local-queue-size", str(args.local_queue_size)]
        argv += ["-m", str(args.concurrency + 1)]
        wall, rss, _ = timed_child(argv, env=env)
        left = remaining(url)
        ours = n / wall
        print(
            f"kongtask --once -j {args.concurrency} (local queue {args.local_queue_size}): "
            f"{wall:.2f}s wall = {ours:,.0f} jobs/s, peak RSS {rss:.0f} MB, {left} left"
        )
        if gw is None:
            return
        gw_add_s = enqueue_graphile_worker(url, n, gw)
        print(
            f"enqueue, graphile-worker addJobs: {n} jobs in {gw_add_s:.3f}s "
            f"= {n / gw_add_s:,.0f} jobs/s"
        )
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
            cli = str(gw / "node_modules" / "graphile-worker" / "dist" / "cli.js")
            gw_env = dict(env, DATABASE_URL=to_uri(url))
            gw_wall, gw_rss, _ = timed_child(["node", cli, "--once"], cwd=cwd, env=gw_env)
        left = remaining(url)
        theirs = n / gw_wall
        print(
            f"graphile-worker {gw.name} --once: {gw_wall:.2f}s wall = {theirs:,.0f} jobs/s, "
            f"peak RSS {gw_rss:.0f} MB, {left} left"
        )
        print(
            f"ratios kongtask / graphile-worker: drain {ours / theirs:.2f}x, "
            f"enqueue WorkerUtils.add_jobs {gw_add_s / utils_s:.2f}x, "
            f"enqueue SQL add_jobs {gw_add_s / sql_s:.2f}x (higher is better)"
        )


if __name__ == "__main__":
    main()
