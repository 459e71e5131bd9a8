"""Fairness benchmark: two worker processes, slow jobs, one worker killed and restarted.

Usage: ``python tools/bench_fairness.py [--seconds 30] [--rate 200] [--job-ms 100]
[-j 16] [--kill-at 10] [--rounds 3] [--compare-graphile-worker]``.

Two kongtask worker processes (the real CLI, ``-j 16``, defaults otherwise)
run on one scratch database while a producer adds jobs whose handler sleeps
``--job-ms`` at a steady ``--rate`` jobs/s for ``--seconds``. After
``--kill-at`` seconds one worker is SIGKILLed and started again at once. Each
handler appends its start time to a file of its own process (unbuffered, so
a SIGKILL loses nothing written), and the claim latency of a job is its first
handler start less its ``run_at``. Printed: settings; p50 / p95 / p99 / max
latency overall and for the jobs added after the restart; jobs/s of each
worker after the restart; and per 5-second window each worker's jobs/s and
the p95 / p99 latency of the jobs due in it (the restart's backlog and the
steady state apart). Jobs the killed worker had
claimed are rescued by the survivors (kongtask's dead-pool check); they are
counted, and their latency shows in the max. Since graphile-worker never runs
its killed worker's jobs, the latency is also printed leaving out, on both
sides, the jobs the killed worker held (running or buffered) at the kill.
Each side runs ``--rounds`` times, the order alternating, on a truncated and
analyzed jobs table; the summary gives min / median over the rounds of the
restarted worker's start-up (its start to its ready line), the restart
window's p95 / p99, the worst p99 of the other windows and the p99 of all
jobs. kongtask runs as ``pip install`` leaves it: a wheel of this checkout
installed into a scratch environment and compiled, so that neither a checkout
run with ``PYTHONDONTWRITEBYTECODE`` (compiling every module at every start)
nor an editable install's hook (run at every interpreter start, the zygote's
included) is counted.

With ``--compare-graphile-worker`` graphile-worker 0.17.3 (from npm, as in
``tools/bench_throughput.py``) runs the same scenario with its CLI
(``--jobs 16``); it has no dead-worker recovery, so the jobs its killed worker
had locked stay locked and are left out (their count is printed).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools._bench_common import (
    fresh_jobs_table,
    graphile_worker_dir,
    installed_python,
    load_average,
    percentile,
    scratch_database,
    server_url,
    summary,
    to_uri,
)

_READY = "Worker connected and looking for jobs"

KT_TASKS = """
import os, time

_out = os.open(os.environ["KONGTASK_BENCH_STARTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
_label = os.environ["KONGTASK_BENCH_LABEL"]
_sleep_s = {job_ms} / 1000.0

def slow(payload, helpers):
    job = helpers.job
    line = f"{{job.id}} {{time.time():.6f}} {{job.run_at.timestamp():.6f}} {{_label}}\\n"
    os.write(_out, line.encode())
    time.sleep(_sleep_s)

tasks = {{"slow": slow}}
"""

GW_TASK = """
const fs = require("fs");
const out = fs.openSync(process.env.KONGTASK_BENCH_STARTS, "a");
const label = process.env.KONGTASK_BENCH_LABEL;
module.exports = async (payload, helpers) => {
  const now = (performance.timeOrigin + performance.now()) / 1000;
  const runAt = new Date(helpers.job.run_at).getTime() / 1000;
  fs.writeSync(out, `${helpers.job.id} ${now.toFixed(6)} ${runAt.toFixed(6)} ${label}\\n`);
  await new Promise((resolve) => setTimeout(resolve, %(job_ms)d));
};
"""

ADD_JOB = "select graphile_worker.add_job('slow', %s::json)"
#: Jobs not yet run, leaving out locks older than this (a killed graphile-worker's).
LEFT = (
    "select count(*) from graphile_worker._private_jobs "
    "where locked_at is null or locked_at > now() - interval '5 seconds'"
)
STUCK = "select count(*) from graphile_worker._private_jobs"
#: The locked jobs and their lockers, read right after the kill.
LOCKED = "select id, locked_by from graphile_worker._private_jobs where locked_at is not null"


class Start(NamedTuple):
    """One handler start: job id, when it started, its run_at (epoch seconds), which worker."""

    job_id: int
    started: float
    run_at: float
    worker: str

    @property
    def wait_ms(self) -> float:
        """The claim latency: this start less the job's run_at, in ms."""
        return (self.started - self.run_at) * 1000


class Side(NamedTuple):
    """How to start one worker process of a side: argv, working folder, extra environment,
    and the log line that says it is up."""

    argv: list[str]
    cwd: str | None
    env: dict[str, str]
    ready: str = _READY


def start_worker(side: Side, label: str, folder: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """Start one worker process writing its handler starts to ``folder/<label>.starts``."""
    log = folder / f"{label}.log"
    env = dict(
        os.environ,
        **side.env,
        KONGTASK_BENCH_STARTS=str(folder / f"{label}.starts"),
        KONGTASK_BENCH_LABEL=label,
        NO_LOG_SUCCESS="1",
    )
    out = log.open("wb")
    proc = subprocess.Popen(side.argv, cwd=side.cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    out.close()
    return proc, log


def wait_ready(proc: subprocess.Popen[bytes], log: Path, ready: str) -> None:
    """Wait (up to a minute) until the worker's log says it is up (``ready``)."""
    pause = threading.Event()
    deadline = time.monotonic() + 60
    while ready not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            pause.wait(0.5)  # what it printed on its way out
            raise SystemExit(
                f"worker did not start (exit {proc.poll()}):\n{log.read_text(errors='replace')}"
            )
        pause.wait(0.02)


def produce(url: str, rate: float, seconds: float, stop: threading.Event) -> int:
    """Add one job every 1/rate s on a fixed schedule (no drift) for ``seconds``; returns
    how many were added."""
    added = 0
    with psycopg.connect(url, autocommit=True) as conn:
        began = time.monotonic()
        while not stop.is_set():
            due = began + added / rate
            if due - began >= seconds:
                break
            delay = due - time.monotonic()
            if delay > 0:
                stop.wait(delay)
            conn.execute(ADD_JOB, (f'{{"n": {added}}}',))
            added += 1
    return added


class Run(NamedTuple):
    """What one side's run left: the handler starts, the restart and the producer's end
    (epoch seconds), jobs added, jobs left locked, the locks read after the kill, and
    how long the restarted worker took from its start to its ready line (s)."""

    starts: list[Start]
    restarted: float
    produced_until: float
    added: int
    stuck: int
    locked_at_kill: dict[int, str]
    start_up_s: float


def run_side(name: str, url: str, side: Side, args: argparse.Namespace, folder: Path) -> Run:
    """Run the scenario once."""
    fresh_jobs_table(url)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for label in ("A", "B"):
            procs[label], log = start_worker(side, label, folder)
            wait_ready(procs[label], log, side.ready)
        stop = threading.Event()
        added: list[int] = []
        producer = threading.Thread(
            target=lambda: added.append(produce(url, args.rate, args.seconds, stop))
        )
        producer.start()
        stop.wait(args.kill_at)
        procs["A"].send_signal(signal.SIGKILL)
        procs["A"].wait()
        restarted = time.time()
        with psycopg.connect(url, autocommit=True) as conn:
            locked_at_kill = {int(i): str(by) for i, by in conn.execute(LOCKED).fetchall()}
        procs["A2"], log = start_worker(side, "A2", folder)
        wait_ready(procs["A2"], log, side.ready)
        start_up_s = time.time() - restarted
        producer.join()
        produced_until = time.time()
        pause = threading.Event()
        deadline = time.monotonic() + args.seconds + 60
        with psycopg.connect(url, autocommit=True) as conn:
            while True:
                row = conn.execute(LEFT).fetchone()
                if (row is not None and row[0] == 0) or time.monotonic() > deadline:
                    break
                pause.wait(0.1)
            pause.wait(args.job_ms / 1000 + 0.2)  # the last handlers end
            row = conn.execute(STUCK).fetchone()
            stuck = row[0] if row is not None else 0
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    starts: list[Start] = []
    for path in sorted(folder.glob("*.starts")):
        for line in path.read_text().splitlines():
            job_id, started, run_at, worker = line.split()
            starts.append(Start(int(job_id), float(started), float(run_at), worker))
        path.unlink()
    print(f"  {name}: {added[0] if added else 0} jobs added")
    added_n = added[0] if added else 0
    return Run(starts, restarted, produced_until, added_n, stuck, locked_at_kill, start_up_s)


def held_by_killed(run: Run) -> set[int]:
    """The jobs the killed worker held (running or buffered) when it was killed.

    Its locker is the one whose locked jobs it had started; graphile-worker never
    runs these again, so a like-for-like latency leaves them out on both sides. A
    kongtask pool may release them before the locks are read, so the jobs the
    killed worker started and another started again count too.
    """
    started_by_a = {s.job_id for s in run.starts if s.worker == "A"}
    lockers = {by for job_id, by in run.locked_at_kill.items() if job_id in started_by_a}
    held = {job_id for job_id, by in run.locked_at_kill.items() if by in lockers}
    again = Counter(s.job_id for s in run.starts)
    return held | {job_id for job_id in started_by_a if again[job_id] > 1}


def line(label: str, values_ms: list[float]) -> str:
    values = sorted(values_ms)
    if not values:
        return f"    {label}: no jobs"
    figures = ", ".join(
        f"{name} {percentile(values, q):,.1f}"
        for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))
    )
    return f"    {label} ({len(values)} jobs): {figures}, max {values[-1]:,.1f} ms"


def report(name: str, run: Run) -> dict[str, float]:
    """Print the latency percentiles and the per-worker rates of one run; return the
    figures the rounds are summed up by (ms; leaving out the killed worker's jobs)."""
    starts, restarted, produced_until = run.starts, run.restarted, run.produced_until
    first: dict[int, Start] = {}
    for start in sorted(starts, key=lambda s: s.started):
        first.setdefault(start.job_id, start)
    runs = Counter(start.job_id for start in starts)
    held = held_by_killed(run)
    latency = [s.wait_ms for s in first.values()]
    after = [s.wait_ms for s in first.values() if s.run_at >= restarted]
    kept = [s.wait_ms for s in first.values() if s.job_id not in held]
    print(f"  {name}: claim latency (handler start - run_at), first start of each job")
    print(line("overall", latency))
    print(line("jobs added after the restart", after))
    print(line(f"leaving out the {len(held)} jobs the killed worker held", kept))
    again = sum(1 for count in runs.values() if count > 1)
    print(
        f"    jobs started: {len(first)} of {run.added}; started more than once (rescued after "
        f"the kill): {again}; left locked at the end: {run.stuck}"
    )
    window = produced_until - restarted
    counts = Counter(s.worker for s in starts if restarted <= s.started <= produced_until)
    rates = ", ".join(f"{worker} {counts[worker] / window:.1f}" for worker in sorted(counts))
    print(f"    jobs/s per worker from the restart to the producer's end ({window:.1f} s): {rates}")
    if not starts:
        return {}
    # Windows of 5 s with the restart on a boundary (the nearest to --kill-at): the
    # restart window is the one that begins with it.
    restart_index = round((restarted - min(s.started for s in starts)) / 5)
    origin = restarted - 5 * restart_index
    buckets: dict[int, Counter[str]] = {}
    for s in starts:
        buckets.setdefault(int((s.started - origin) // 5), Counter())[s.worker] += 1
    waits: dict[int, list[float]] = {}
    waits_kept: dict[int, list[float]] = {}
    for s in first.values():
        index = int((s.run_at - origin) // 5)
        waits.setdefault(index, []).append(s.wait_ms)
        if s.job_id not in held:
            waits_kept.setdefault(index, []).append(s.wait_ms)
    print(
        f"    per 5 s window (restart at {restarted - origin:.1f} s): jobs/s per worker; "
        "p95 / p99 latency of the jobs due in it; the same leaving out the killed worker's"
    )
    for index in sorted(buckets):
        cells = ", ".join(f"{w} {buckets[index][w] / 5:.0f}" for w in sorted(buckets[index]))
        print(
            f"      {index * 5:>3}-{index * 5 + 5:<3} s: {cells}; "
            f"{_tail(waits.get(index, []))}; {_tail(waits_kept.get(index, []))}"
        )
    restart_window = sorted(waits_kept.get(restart_index, [0.0]))
    others = [
        percentile(sorted(values), 0.99)
        for index, values in waits_kept.items()
        if index != restart_index and len(values) >= 500  # whole windows only
    ]
    return {
        "start-up of the restarted worker": run.start_up_s * 1000,
        "restart window p95": percentile(restart_window, 0.95),
        "restart window p99": percentile(restart_window, 0.99),
        "other windows, worst p99": max(others, default=0.0),
        "all jobs p99": percentile(sorted(kept), 0.99),
    }


def _tail(values: list[float]) -> str:
    """p95 / p99 of ``values`` in ms, or a dash."""
    due = sorted(values)
    return f"{percentile(due, 0.95):,.1f} / {percentile(due, 0.99):,.1f} ms" if due else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="producer time (30)")
    parser.add_argument("--rate", type=float, default=200.0, help="jobs added per second (200)")
    parser.add_argument("--job-ms", type=int, default=100, help="handler sleep, ms (100)")
    parser.add_argument("-j", "--concurrency", type=int, default=16, help="per worker (16)")
    parser.add_argument("--kill-at", type=float, default=10.0, help="SIGKILL one worker (10 s)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per side (3)")
    parser.add_argument("--compare-graphile-worker", action="store_true")
    args = parser.parse_args()
    load = load_average()
    print(
        f"settings: 2 worker processes, -j {args.concurrency} each (defaults otherwise), "
        f"{args.job_ms} ms sleeping jobs added one at a time at {args.rate:g} jobs/s for "
        f"{args.seconds:g} s; worker A SIGKILLed at {args.kill_at:g} s and started again at "
        f"once; {args.rounds} rounds per side, order alternated, jobs table truncated and "
        f"analyzed before each; kongtask installed from a wheel of this checkout into a "
        f"scratch environment, as pip install leaves it (compiled, no editable-install "
        f"hook); cores={os.cpu_count()}, load average at the start {load}"
    )
    with scratch_database(server_url()) as url, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tasks = folder / "fair_tasks.py"
        tasks.write_text(KT_TASKS.format(job_ms=args.job_ms))
        python = installed_python(folder / "install")
        cli = [python, "-m", "kongtask", "-c", url, "--tasks", str(tasks)]
        sides = {"kongtask": Side([*cli, "-j", str(args.concurrency)], tmp, {})}
        if args.compare_graphile_worker:
            gw = graphile_worker_dir()
            cwd = folder / "gw"
            (cwd / "tasks").mkdir(parents=True)
            (cwd / "tasks" / "slow.js").write_text(GW_TASK % {"job_ms": args.job_ms})
            os.symlink(gw / "node_modules", cwd / "node_modules")
            gw_cli = str(gw / "node_modules" / "graphile-worker" / "dist" / "cli.js")
            sides["graphile-worker 0.17.3"] = Side(
                ["node", gw_cli, "--jobs", str(args.concurrency)],
                str(cwd),
                {"DATABASE_URL": to_uri(url)},
                # Its "looking for jobs" line does not reach a log file here; this one
                # comes once its tasks are loaded, just before it connects.
                "cron is disabled",
            )
        figures: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
        for round_no in range(args.rounds):
            order = list(sides) if round_no % 2 == 0 else list(reversed(sides))
            print(f"round {round_no + 1}: {' then '.join(order)}")
            for name in order:
                figures[name].append(report(name, run_side(name, url, sides[name], args, folder)))
    print(
        f"summary over {args.rounds} rounds, min / median (ms; leaving out the jobs the "
        "killed worker held):"
    )
    for measure in next(iter(figures.values()))[0]:
        cells = []
        for name, rounds in figures.items():
            low, median = summary([r[measure] for r in rounds if measure in r])
            cells.append(f"{name} {low:,.1f} / {median:,.1f}")
        print(f"  {measure}: {'; '.join(cells)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
