"""The price of fleet-wide limits: drain throughput across 3 worker processes.

Usage: ``python tools/bench_limits.py [-n 2000] [-j 4] [--rounds 3]``.

Set-ups, alternated round by round (the order reversed every other round):

* ``no limits``: no limit rows at all (the ordinary claim only);
* ``limit on another task``: a limit exists, on a task nobody enqueues (the
  ordinary claim leaves that task out with its array parameter);
* ``limit never binds``: concurrency 100,000 on the drained task, so every
  claim of it is the serialized limited claim, which never runs out of room;
* ``binding limit``: concurrency ``--binding`` (default 4) on the drained task.

For every drain three fresh ``kongtask`` worker processes (``-j N`` each) are
started and timed only once all say they are ready; then ``-n`` no-op jobs are
added in one statement and the clock stops when the jobs table is empty. Then
the starvation check: 30 jobs that sleep 0.3 s at concurrency 2 (ideal 4.5 s),
timed the same way. Prints every figure, then min and median per set-up.

Creates a scratch database on ``KONGTASK_BENCH_URL`` (or ``DATABASE_URL``, else
postgresql://postgres@127.0.0.1:5432/postgres) and drops it afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kongtask import WorkerUtils
from tools._bench_common import (
    fresh_jobs_table,
    load_average,
    scratch_database,
    server_url,
    summary,
    to_uri,
)

TASKS = """
import time


def noop(payload, helpers):
    return None


def nap(payload, helpers):
    time.sleep(payload["s"])
"""

ENQUEUE = (
    "select count(*) from graphile_worker.add_jobs(array("
    "select json_populate_recordset(null::graphile_worker.job_spec, %s::json)))"
)
COUNT = "select count(*) from graphile_worker._private_jobs"
_READY = "Worker connected and looking for jobs"
WORKERS = 3


def set_up(url: str, name: str, binding: int) -> None:
    """Leave exactly the limits of set-up ``name``."""
    with WorkerUtils(url) as utils:
        for limit in utils.list_limits():
            kind, key = limit.key_kind, limit.key
            utils.clear_limit(
                key if kind == "task" else None,
                queue=key if kind == "queue" else None,
                flag=key if kind == "flag" else None,
            )
        if name == "limit on another task":
            utils.set_limit("report", concurrency=1)
        elif name == "limit never binds":
            utils.set_limit("noop", concurrency=100_000)
        elif name == "binding limit":
            utils.set_limit("noop", concurrency=binding)
        elif name == "starvation":
            utils.set_limit("nap", concurrency=2)


@contextmanager
def workers(url: str, tasks: Path, folder: Path, jobs: int) -> Iterator[None]:
    """Three worker processes, yielded once every one is ready."""
    argv = [sys.executable, "-m", "kongtask", "-c", to_uri(url), "--tasks", str(tasks)]
    argv += ["-j", str(jobs), "--poll-interval", "200"]
    logs = [folder / f"worker{i}.log" for i in range(WORKERS)]
    outs = [log.open("wb") for log in logs]
    procs = [subprocess.Popen(argv, stdout=o, stderr=subprocess.STDOUT) for o in outs]
    pause = threading.Event()
    try:
        deadline = time.monotonic() + 120
        while not all(_READY in log.read_text(errors="replace") for log in logs):
            if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                text = "\n".join(log.read_text(errors="replace") for log in logs)
                raise SystemExit(f"a worker did not start:\n{text}")
            pause.wait(0.05)
        yield
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for out in outs:
            out.close()


def drain(url: str, tasks: Path, folder: Path, jobs: int, specs: list[dict[str, object]]) -> float:
    """Seconds from adding ``specs`` (workers ready) to an empty jobs table."""
    fresh_jobs_table(url)
    pause = threading.Event()
    with workers(url, tasks, folder, jobs), psycopg.connect(url, autocommit=True) as conn:
        started = time.perf_counter()
        conn.execute(ENQUEUE, (json.dumps(specs),))
        while True:
            row = conn.execute(COUNT).fetchone()
            if row is not None and row[0] == 0:
                return time.perf_counter() - started
            pause.wait(0.01)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=2000, help="no-op jobs per drain (default 2000)")
    parser.add_argument("-j", type=int, default=4, help="executors per process (default 4)")
    parser.add_argument("--binding", type=int, default=4, help="the binding limit (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    args = parser.parse_args()
    names = ["no limits", "limit on another task", "limit never binds", "binding limit"]
    load = load_average()
    print(f"load average (1, 5, 15 min) at the start: {load} (other work on the host)")
    print(
        f"settings: {WORKERS} worker processes x -j {args.j}, n={args.n} no-op jobs per drain, "
        f"binding limit = concurrency {args.binding}, rounds={args.rounds} (set-ups alternated), "
        f"poll 200 ms, cores={os.cpu_count()}, Python {platform.python_version()}; timed from "
        "enqueue (workers already ready) to an empty jobs table"
    )
    rates: dict[str, list[float]] = {name: [] for name in names}
    naps: list[float] = []
    noop = [{"identifier": "noop", "payload": {"n": i}} for i in range(args.n)]
    nap = [{"identifier": "nap", "payload": {"s": 0.3}} for _ in range(30)]
    with scratch_database(server_url()) as url, tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        tasks = folder / "bench_tasks.py"
        tasks.write_text(TASKS)
        for round_no in range(args.rounds):
            order = names if round_no % 2 == 0 else names[::-1]
            for name in order:
                set_up(url, name, args.binding)
                seconds = drain(url, tasks, folder, args.j, noop)
                rates[name].append(args.n / seconds)
                print(f"  round {round_no + 1}: {name}: {args.n / seconds:.0f} jobs/s", flush=True)
            set_up(url, "starvation", args.binding)
            naps.append(drain(url, tasks, folder, args.j, nap))
            print(f"  round {round_no + 1}: 30 x 0.3 s at concurrency 2: {naps[-1]:.2f} s")
    print("load average (1, 5, 15 min) at the end: " + load_average())
    for name in names:
        low, median = summary(rates[name])
        print(f"{name:24s} min {low:7.0f}  median {median:7.0f} jobs/s")
    low, median = summary(naps)
    print(f"30 x 0.3 s at concurrency 2 (ideal 4.50 s): min {low:.2f}  median {median:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
