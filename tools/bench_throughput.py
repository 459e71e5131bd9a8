"""Throughput benchmark: kongtask against graphile-worker 0.17.3 under the same conditions.

Usage: ``python tools/bench_throughput.py [-n 100000] [-j 24] [--local-queue-size 500]
[--rounds 3] [--compare-graphile-worker] [--sustained 2000,10000 --seconds 60]``.

Creates a scratch database on ``KONGTASK_BENCH_URL`` (or ``DATABASE_URL``, else
postgresql://postgres@127.0.0.1:5432/postgres) and drops it afterwards.

Drain: before every drain the jobs table is truncated (no dead rows from the
previous drain), N no-op jobs are added through the schema's ``add_jobs`` and
the table is analyzed; then the real CLI (``kongtask --once`` or graphile-worker's
``cli.js --once``) drains them in a subprocess, timed from spawn to exit, so
start-up counts. Rounds alternate which side goes first, and min / median are
printed. The parity line gives both sides the same settings (printed); the
defaults line runs each side with its own out-of-the-box settings. Each drain
also prints, per job: wall time, the worker process tree's CPU (user + system
of the worker and every child it reaped, from ``wait4``) and PostgreSQL's CPU
(utime + stime + cutime + cstime of the postmaster and its live children,
before and after the drain, so backends that exited count too). The server
figure needs the server on this machine (its processes readable in
``/proc``); it counts every database on that server, so other clients' work
shows in it: read it on an otherwise idle server.

Enqueue: ``WorkerUtils.add_jobs`` against graphile-worker's ``addJobs`` (and the
``add_jobs`` SQL function), alternated the same way (``tools/bench_enqueue.py``
compares them in more detail: batch sizes, specs with every field).

Sustained (``--sustained RATES``): a producer adds jobs at each fixed rate for
``--seconds`` while a worker with 1 ms handlers runs (same settings both
sides); prints completions/s and pickup latency (job created -> handler
start) p50 / p95 / p99.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools._bench_common import (
    cluster_cpu_seconds,
    enqueue_noop_jobs,
    fresh_jobs_table,
    graphile_worker_dir,
    percentile,
    postmaster_pid,
    scratch_database,
    server_url,
    summary,
    to_uri,
)
from tools.bench_enqueue import add_graphile_worker, add_kongtask, make_specs, node_specs

ENQUEUE = """
select count(*) from graphile_worker.add_jobs(array(
    select json_populate_recordset(null::graphile_worker.job_spec, %s::json)
))
"""

NOOP_TASKS = """
def noop(payload, helpers):
    pass
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
    return add_kongtask(url, make_specs(count, "plain"), count)


def enqueue_graphile_worker(url: str, count: int, gw: Path) -> float:
    """Seconds for one graphile-worker ``addJobs`` call (timed inside Node)."""
    with tempfile.TemporaryDirectory(prefix="kongtask-bench-specs-") as folder:
        specs_file = Path(folder, "specs.json")
        specs_file.write_text(json.dumps(node_specs(make_specs(count, "plain"))))
        return add_graphile_worker(url, specs_file, count, gw)


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
) -> tuple[float, float, float, str]:
    """Run a child; returns (wall seconds, peak RSS in MB, CPU seconds, stdout).

    The peak comes from ``/proc/PID/status`` (``VmHWM``, sampled every 10 ms
    while the child runs): ``getrusage``'s ``ru_maxrss`` would also count the
    memory of this (large) parent that the child had between fork and exec.
    The CPU is user + system time of the child and of every descendant it
    reaped (``wait4``'s resource usage).
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
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    if child.returncode != 0:
        raise SystemExit(f"{argv[0]} exited with {child.returncode}")
    return wall, peak[0] / 1024, usage.ru_utime + usage.ru_stime, out


GW_TASK = "module.exports = async () => {};\n"

GW_SUSTAINED_TASK = r"""
const fs = require("fs");
const out = process.env.KONGTASK_BENCH_PICKUPS;
const pickups = [];
let flushed = false;
function flush() {
  if (flushed) return;
  flushed = true;
  fs.writeFileSync(out, JSON.stringify(pickups));
}
process.on("exit", flush);
process.on("SIGTERM", () => {});
module.exports = async (payload, helpers) => {
  const now = performance.timeOrigin + performance.now();
  pickups.push(now - new Date(helpers.job.created_at).getTime());
  await new Promise((resolve) => setTimeout(resolve, 1));
};
"""

KT_SUSTAINED_TASKS = """
import atexit, json, os, threading, time
_pickups = []
_pause = threading.Event()

def sleep1(payload, helpers):
    _pickups.append((time.time() - helpers.job.created_at.timestamp()) * 1000)
    _pause.wait(0.001)

@atexit.register
def _flush():
    with open(os.environ["KONGTASK_BENCH_PICKUPS"], "w") as out:
        json.dump(_pickups, out)

tasks = {"sleep1": sleep1}
"""


def gw_config(concurrency: int, pool: int, local_queue: int | None) -> str:
    """graphile-worker settings: perfTest's tuning when ``local_queue`` is given, else defaults."""
    if local_queue is None:
        return "module.exports = {};\n"
    return GW_CONFIG % {"concurrency": concurrency, "pool": pool, "local_queue": local_queue}


class Drain(NamedTuple):
    """One drain: wall seconds, peak RSS (MB), the worker process tree's CPU seconds and
    PostgreSQL's (None where the server's processes cannot be read)."""

    wall: float
    rss: float
    cpu: float
    server_cpu: float | None
    #: What the drain asked of the database (:data:`WORK`), the counters' differences.
    work: dict[str, float]


#: The database's own counters of work done: this database's transactions, buffer
#: reads and tuples, and the cluster's WAL (nothing else writes during a drain).
WORK = """
select xact_commit + xact_rollback, blks_hit + blks_read, tup_returned, tup_fetched,
       tup_inserted + tup_updated + tup_deleted, wal_records, wal_fpi, wal_bytes
from pg_stat_database, pg_stat_wal
where datname = current_database()
"""
WORK_NAMES = (
    "transactions", "buffers", "tuples returned", "tuples fetched", "tuples written",
    "WAL records", "WAL full pages", "WAL bytes",
)  # fmt: skip


def database_work(url: str) -> dict[str, float]:
    """The :data:`WORK` counters once they hold still: a backend that just exited reports
    its last counts as it goes, so two equal reads 0.2 s apart (at most 5 s) are taken."""
    last: tuple[Any, ...] | None = None
    deadline = time.monotonic() + 5
    with psycopg.connect(url, autocommit=True) as conn:
        while True:
            row = conn.execute(WORK).fetchone()
            assert row is not None
            if row == last or time.monotonic() > deadline:
                break
            last = row
            time.sleep(0.2)
    return {name: float(value) for name, value in zip(WORK_NAMES, row, strict=True)}


def measured(url: str, run: Callable[[], tuple[float, float, float, str]]) -> Drain:
    """Run a child drain; read the PostgreSQL cluster's CPU and the database's counters
    of work before and after it."""
    postmaster = postmaster_pid(url)
    work_before = database_work(url)
    before = cluster_cpu_seconds(postmaster) if postmaster is not None else None
    wall, rss, cpu, _ = run()
    after = cluster_cpu_seconds(postmaster) if postmaster is not None else None
    server = after - before if before is not None and after is not None else None
    work_after = database_work(url)
    work = {name: work_after[name] - work_before[name] for name in WORK_NAMES}
    return Drain(wall, rss, cpu, server, work)


def drain_kongtask(url: str, tasks_file: Path, options: list[str]) -> Drain:
    argv = [*kongtask_cli(), "-c", url, "--tasks", str(tasks_file), "--once", *options]
    return measured(url, lambda: timed_child(argv, env=dict(os.environ, NO_LOG_SUCCESS="1")))


def drain_graphile_worker(url: str, gw: Path, config: str) -> Drain:
    with tempfile.TemporaryDirectory(prefix="kongtask-bench-gw-") as cwd:
        Path(cwd, "tasks").mkdir()
        Path(cwd, "tasks", "noop.js").write_text(GW_TASK)
        Path(cwd, "graphile.config.js").write_text(config)
        os.symlink(gw / "node_modules", Path(cwd, "node_modules"))
        cli = str(gw / "node_modules" / "graphile-worker" / "dist" / "cli.js")
        env = dict(os.environ, NO_LOG_SUCCESS="1", DATABASE_URL=to_uri(url))
        return measured(url, lambda: timed_child(["node", cli, "--once"], cwd=cwd, env=env))


def alternate(rounds: int, sides: dict[str, Any]) -> dict[str, list[Any]]:
    """Run each side once per round, the order flipping every round."""
    names = list(sides)
    results: dict[str, list[Any]] = {name: [] for name in names}
    for index in range(rounds):
        order = names if index % 2 == 0 else names[::-1]
        for name in order:
            results[name].append(sides[name]())
    return results


def per_job_us(n: int, seconds: list[float]) -> tuple[float, float]:
    """(min, median) microseconds per job."""
    best, median = summary(seconds)
    return best / n * 1e6, median / n * 1e6


def print_drains(label: str, n: int, results: dict[str, list[Drain]]) -> None:
    """Wall time, the worker's and PostgreSQL's CPU per job, each side; ratios for two sides."""
    figures: dict[str, dict[str, tuple[float, float]]] = {}
    for name, runs in results.items():
        walls = [run.wall for run in runs]
        best, median = summary(walls)
        rss = max(run.rss for run in runs)
        print(
            f"  {label} {name}: best {n / best:,.0f} jobs/s, median {n / median:,.0f} jobs/s "
            f"(walls {', '.join(f'{w:.2f}' for w in walls)} s), peak RSS {rss:.0f} MB"
        )
        side = {"wall": per_job_us(n, walls), "worker CPU": per_job_us(n, [r.cpu for r in runs])}
        server = [run.server_cpu for run in runs]
        if all(value is not None for value in server):
            side["PostgreSQL CPU"] = per_job_us(n, [v for v in server if v is not None])
        figures[name] = side
        print(
            "    per job: "
            + "; ".join(f"{what} {b:.1f} µs (median {m:.1f})" for what, (b, m) in side.items())
            + ("" if "PostgreSQL CPU" in side else "; PostgreSQL CPU not measurable here")
        )
        work = {what: statistics.median(run.work[what] for run in runs) / n for what in WORK_NAMES}
        print(
            "    database work per job (median of rounds): "
            + "; ".join(f"{what} {value:.3g}" for what, value in work.items())
        )
    if len(figures) == 2:
        (a, fa), (b, fb) = figures.items()
        ratios = [
            f"{what} {fb[what][0] / fa[what][0]:.2f}x (median {fb[what][1] / fa[what][1]:.2f}x)"
            for what in fa
            if what in fb
        ]
        print(f"  {label} {a} cheaper/faster than {b} by: " + "; ".join(ratios))


def sustained(
    url: str, rate: int, seconds: float, start_worker: Any, pickups_file: Path
) -> tuple[float, list[float]]:
    """Produce ``rate`` jobs/s for ``seconds`` beside a running worker; (completions/s, pickups).

    Pickups are counted for every job the worker started before it exited,
    so a worker that fell behind also reports the pickups of its backlog.
    """
    fresh_jobs_table(url)
    if pickups_file.exists():
        pickups_file.unlink()
    worker = start_worker()
    try:
        tick_s = 0.01
        per_tick = max(1, round(rate * tick_s))
        produced = 0
        with psycopg.connect(url, autocommit=True) as conn:
            # Warm up: the worker is connected once a first job is gone.
            conn.execute(ENQUEUE, (json.dumps([{"identifier": "sleep1", "payload": {}}]),))
            deadline = time.monotonic() + 30
            while remaining(url) and time.monotonic() < deadline:
                time.sleep(0.05)
            started = time.monotonic()
            spec = {"identifier": "sleep1", "payload": {}}
            while (now := time.monotonic()) - started < seconds:
                # Catch up in one statement when a tick ran late, so the rate holds
                # as long as the database can take it.
                due = min(int(rate * (now - started)) - produced, 5 * per_tick)
                if due > 0:
                    conn.execute(ENQUEUE, (json.dumps([spec] * due),))
                    produced += due
                time.sleep(tick_s)
            elapsed = time.monotonic() - started
            backlog = remaining(url)
    finally:
        signalled = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
        print(f"    (worker exited {time.monotonic() - signalled:.1f} s after SIGTERM)")
    completed = produced - backlog
    values = json.loads(pickups_file.read_text()) if pickups_file.exists() else []
    print(f"    (produced {produced / elapsed:,.0f} jobs/s; backlog at the end {backlog:,})")
    return completed / elapsed, values[1:]  # the warm-up job is not counted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--jobs", type=int, default=100_000)
    parser.add_argument("-j", "--concurrency", type=int, default=24)
    parser.add_argument("--local-queue-size", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compare-graphile-worker", action="store_true")
    parser.add_argument("--no-defaults", action="store_true", help="skip the defaults line")
    parser.add_argument("--no-enqueue", action="store_true", help="skip the enqueue figures")
    parser.add_argument("--no-drain", action="store_true", help="skip the drains")
    parser.add_argument("--sustained", default="", help="producer rates, e.g. 2000,10000")
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    n, c, lq = args.jobs, args.concurrency, args.local_queue_size
    gw = graphile_worker_dir() if args.compare_graphile_worker else None
    if not (args.no_drain and args.no_enqueue):
        print(
            f"settings (parity, both sides): {n} no-op jobs, concurrency {c}, local queue {lq}, "
            f"pool {c + 1}; graphile-worker also completeJobBatchDelay 0, failJobBatchDelay 0, "
            f"refetchDelay 10 ms (its perfTest tuning); {args.rounds} rounds, order alternated, "
            f"jobs table truncated and analyzed before every drain"
        )
    with scratch_database(server_url()) as url, tempfile.TemporaryDirectory() as tmp:
        tasks_file = Path(tmp, "noop_tasks.py")
        tasks_file.write_text(NOOP_TASKS)
        parity = ["-j", str(c), "--local-queue-size", str(lq), "-m", str(c + 1)]

        def kt(options: list[str]) -> Any:
            def run() -> Drain:
                fresh_jobs_table(url)
                enqueue_noop_jobs(url, n)
                result = drain_kongtask(url, tasks_file, options)
                assert remaining(url) == 0, "kongtask left jobs behind"
                return result

            return run

        def gwd(config: str) -> Any:
            def run() -> Drain:
                assert gw is not None
                fresh_jobs_table(url)
                enqueue_noop_jobs(url, n)
                result = drain_graphile_worker(url, gw, config)
                assert remaining(url) == 0, "graphile-worker left jobs behind"
                return result

            return run

        if not args.no_drain:
            sides: dict[str, Any] = {"kongtask": kt(parity)}
            if gw is not None:
                sides["graphile-worker"] = gwd(gw_config(c, c + 1, lq))
            print_drains("drain, parity settings:", n, alternate(args.rounds, sides))
            if not args.no_defaults:
                sides = {"kongtask": kt([])}
                if gw is not None:
                    sides["graphile-worker"] = gwd(gw_config(c, c + 1, None))
                print_drains(
                    "drain, each side's defaults (kongtask -j 1, local queue 16; "
                    "graphile-worker concurrency 1, no local queue):",
                    n,
                    alternate(args.rounds, sides),
                )
        if not args.no_enqueue:
            enqueue_sides: dict[str, Any] = {
                "kongtask WorkerUtils.add_jobs": lambda: (
                    fresh_jobs_table(url),
                    enqueue_worker_utils(url, n),
                )[1],
                "add_jobs SQL function": lambda: (fresh_jobs_table(url), enqueue_sql(url, n))[1],
            }
            if gw is not None:
                enqueue_sides["graphile-worker addJobs"] = lambda: (
                    fresh_jobs_table(url),
                    enqueue_graphile_worker(url, n, gw),
                )[1]
            results = alternate(args.rounds, enqueue_sides)
            for name, seconds in results.items():
                best, median = summary(seconds)
                print(
                    f"  enqueue {n}, {name}: best {n / best:,.0f} jobs/s, "
                    f"median {n / median:,.0f} jobs/s"
                )
            if gw is not None:
                ours = summary(results["kongtask WorkerUtils.add_jobs"])
                theirs = summary(results["graphile-worker addJobs"])
                print(
                    "  enqueue ratio WorkerUtils.add_jobs / addJobs: "
                    f"best {theirs[0] / ours[0]:.2f}x, median {theirs[1] / ours[1]:.2f}x"
                )
            fresh_jobs_table(url)
        for rate in [int(r) for r in args.sustained.split(",") if r.strip()]:
            run_sustained(url, rate, args, Path(tmp), gw)


def run_sustained(url: str, rate: int, args: Any, tmp: Path, gw: Path | None) -> None:
    c, lq = args.concurrency, args.local_queue_size
    pickups_file = tmp / "pickups.json"
    tasks_file = tmp / "sustained_tasks.py"
    tasks_file.write_text(KT_SUSTAINED_TASKS)
    env = dict(os.environ, NO_LOG_SUCCESS="1", KONGTASK_BENCH_PICKUPS=str(pickups_file))

    def start_kongtask() -> subprocess.Popen[bytes]:
        argv = [*kongtask_cli(), "-c", url, "--tasks", str(tasks_file)]
        argv += ["-j", str(c), "--local-queue-size", str(lq), "-m", str(c + 1)]
        return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL)

    gw_dir = tempfile.mkdtemp(prefix="kongtask-bench-gw-", dir=tmp)

    def start_gw() -> subprocess.Popen[bytes]:
        assert gw is not None
        Path(gw_dir, "tasks").mkdir(exist_ok=True)
        Path(gw_dir, "tasks", "sleep1.js").write_text(GW_SUSTAINED_TASK)
        Path(gw_dir, "graphile.config.js").write_text(gw_config(c, c + 1, lq))
        if not Path(gw_dir, "node_modules").exists():
            os.symlink(gw / "node_modules", Path(gw_dir, "node_modules"))
        cli = str(gw / "node_modules" / "graphile-worker" / "dist" / "cli.js")
        return subprocess.Popen(
            ["node", cli],
            cwd=gw_dir,
            env=dict(env, DATABASE_URL=to_uri(url)),
            stdout=subprocess.DEVNULL,
        )

    sides: dict[str, Any] = {
        "kongtask": lambda: sustained(url, rate, args.seconds, start_kongtask, pickups_file)
    }
    if gw is not None:
        sides["graphile-worker"] = lambda: sustained(
            url, rate, args.seconds, start_gw, pickups_file
        )
    print(
        f"sustained {rate:,} jobs/s for {args.seconds:.0f} s, 1 ms handlers, concurrency {c}, "
        f"local queue {lq}:"
    )
    for name, runs in alternate(1, sides).items():
        for done_per_s, values in runs:
            ordered = sorted(values) or [float("nan")]
            print(
                f"  {name}: {done_per_s:,.0f} completions/s; pickup p50 "
                f"{percentile(ordered, 0.5):.1f} / p95 {percentile(ordered, 0.95):.1f} / "
                f"p99 {percentile(ordered, 0.99):.1f} ms (n={len(values)})"
            )


if __name__ == "__main__":
    main()
