"""CPU-bound drain: ``kongtask --processes N`` against threads (``-j N``) in one process.

Usage: ``python tools/bench_processes.py [-n 400] [--work-ms 20] [--rounds 3]``.

Each job runs a pure-Python loop calibrated here to take ``--work-ms`` on one
core (it holds the GIL all along). Four set-ups are measured, alternated round
by round: one process with ``-j 1`` and ``-j 2`` (threads), and
``--processes 1`` and ``--processes 2`` with ``-j 1`` each. For every drain the
workers are started first and timed only once every one of them says it is
ready (start-up is not counted): then N jobs are added in one statement and the
clock stops when the jobs table is empty. Prints jobs/s, min and median over
the rounds, with the settings, and how many cores the workers kept busy
(their CPU seconds over the drain's wall seconds: one process running
Python code holds one GIL, so it stays near 1 however many threads it has).

Creates a scratch database on ``KONGTASK_BENCH_URL`` (or ``DATABASE_URL``, else
postgresql://postgres@127.0.0.1:5432/postgres) and drops it afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools._bench_common import (
    fresh_jobs_table,
    load_average,
    scratch_database,
    server_url,
    summary,
    to_uri,
)

TASKS = """
SPINS = {spins}


def spin(payload, helpers):
    total = 0
    for i in range(SPINS):
        total += i * i
    return None
"""

ENQUEUE = (
    "select count(*) from graphile_worker.add_jobs(array("
    "select json_populate_recordset(null::graphile_worker.job_spec, %s::json)))"
)
COUNT = "select count(*) from graphile_worker._private_jobs"
_CHILD = re.compile(r"Started worker process \d+ \(pid (\d+)\)")
_READY = "Worker connected and looking for jobs"

#: name -> (--processes or None, -j)
SETUPS: dict[str, tuple[int | None, int]] = {
    "1 process, -j 1": (None, 1),
    "1 process, -j 2 (threads)": (None, 2),
    "--processes 1 -j 1": (1, 1),
    "--processes 2 -j 1": (2, 1),
}


def calibrate(work_ms: float) -> int:
    """Loop iterations that take ``work_ms`` here (the median of a few timings)."""
    spins = 100_000
    timings = []
    for _ in range(5):
        started = time.perf_counter()
        total = 0
        for i in range(spins):
            total += i * i
        timings.append(time.perf_counter() - started)
    per_spin = sorted(timings)[2] / spins
    return max(1, round(work_ms / 1000 / per_spin))


def _cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds the processes ``pids`` have used so far (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def drain(
    url: str, tasks: Path, log: Path, n: int, processes: int | None, jobs: int
) -> tuple[float, float]:
    """Start the worker(s), wait until ready, add ``n`` jobs: (seconds until all are done,
    CPU seconds the workers used meanwhile)."""
    fresh_jobs_table(url)
    specs = json.dumps([{"identifier": "spin", "payload": {"n": i}} for i in range(n)])
    argv = [sys.executable, "-m", "kongtask", "-c", to_uri(url), "--tasks", str(tasks)]
    argv += ["-j", str(jobs), "--poll-interval", "200"]
    if processes is not None:
        argv += ["--processes", str(processes)]
    expected_ready = processes or 1
    pause = threading.Event()
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while log.read_text(errors="replace").count(_READY) < expected_ready:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"worker did not start:\n{log.read_text(errors='replace')}")
                pause.wait(0.05)
            text = log.read_text(errors="replace")
            workers = [int(p) for p in _CHILD.findall(text)] if processes else [proc.pid]
            cpu_before = _cpu_s(workers)
            started = time.perf_counter()
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(ENQUEUE, (specs,))
                while True:
                    row = conn.execute(COUNT).fetchone()
                    if row is not None and row[0] == 0:
                        break
                    pause.wait(0.01)
            return time.perf_counter() - started, _cpu_s(workers) - cpu_before
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=400, help="jobs per drain (default 400)")
    parser.add_argument("--work-ms", type=float, default=20.0, help="CPU per job (default 20)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    args = parser.parse_args()
    spins = calibrate(args.work_ms)
    load = load_average()
    print(f"load average (1, 5, 15 min) at the start: {load} (other work on the host)")
    print(
        f"settings: n={args.n} jobs per drain, {args.work_ms:g} ms pure-Python loop per job "
        f"({spins} iterations), rounds={args.rounds} (set-ups alternated), poll 200 ms, "
        f"cores={os.cpu_count()}, Python {platform.python_version()}, timed from enqueue "
        f"(workers already ready) to an empty jobs table"
    )
    results: dict[str, list[float]] = {name: [] for name in SETUPS}
    cores: dict[str, list[float]] = {name: [] for name in SETUPS}
    with scratch_database(server_url()) as url, tempfile.TemporaryDirectory() as folder:
        tasks = Path(folder) / "cpu_tasks.py"
        tasks.write_text(TASKS.format(spins=spins))
        names = list(SETUPS)
        for round_no in range(args.rounds):
            order = names if round_no % 2 == 0 else names[::-1]
            for name in order:
                processes, jobs = SETUPS[name]
                seconds, cpu = drain(
                    url, tasks, Path(folder) / "worker.log", args.n, processes, jobs
                )
                results[name].append(args.n / seconds)
                cores[name].append(cpu / seconds)
                print(
                    f"  round {round_no + 1}: {name}: {args.n / seconds:.1f} jobs/s, "
                    f"{cpu / seconds:.2f} cores busy",
                    flush=True,
                )
    ideal = 1000 / args.work_ms
    print("load average (1, 5, 15 min) at the end: " + load_average())
    print(f"one core at {args.work_ms:g} ms a job would do {ideal:.0f} jobs/s")
    for name, rates in results.items():
        low, median = summary(rates)
        _, busy = summary(cores[name])
        print(
            f"{name:28s} min {low:7.1f}  median {median:7.1f} jobs/s   median {busy:.2f} cores busy"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
