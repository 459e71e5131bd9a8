"""Bulk enqueue benchmark: ``WorkerUtils.add_jobs`` against graphile-worker 0.17.3's ``addJobs``.

Usage: ``python tools/bench_enqueue.py [-n 100000] [--batch-size 100000] [--rounds 3]
[--kind plain|mixed] [--no-compare-graphile-worker]``.

Creates a scratch database on ``KONGTASK_BENCH_URL`` (or ``DATABASE_URL``, else
postgresql://postgres@127.0.0.1:5432/postgres) and drops it afterwards.

Both sides get the same specs (``plain``: a task identifier and a small
payload; ``mixed``: also named queues, run_at, max_attempts, priorities and
flags on some of them), built before the clock starts, and add them in the
same batch sizes over one open connection; each side is timed around its
``add_jobs`` / ``addJobs`` calls only (Node's inside Node). Before every run
the jobs table is truncated and vacuumed, rounds alternate which side goes
first, and min and median are printed. Each side gets back the added jobs
(kongtask builds ``Job`` records, graphile-worker its rows).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools._bench_common import (
    GRAPHILE_WORKER_VERSION,
    fresh_jobs_table,
    graphile_worker_dir,
    scratch_database,
    server_url,
    summary,
    to_uri,
)

GW_ADD_JOBS = """
const fs = require("fs");
const { makeWorkerUtils } = require("graphile-worker");
async function main() {
  const specs = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
  for (const spec of specs) if (spec.runAt) spec.runAt = new Date(spec.runAt);
  const batch = Number(process.argv[3]);
  const utils = await makeWorkerUtils({ connectionString: process.env.DATABASE_URL });
  try {
    await utils.withPgClient((client) => client.query("select 1"));
    let added = 0;
    const started = process.hrtime.bigint();
    for (let i = 0; i < specs.length; i += batch) {
      added += (await utils.addJobs(specs.slice(i, i + batch))).length;
    }
    const seconds = Number(process.hrtime.bigint() - started) / 1e9;
    if (added !== specs.length) throw new Error(`added ${added} of ${specs.length}`);
    console.log(seconds);
  } finally {
    await utils.release();
  }
}
main().catch((e) => { console.error(e); process.exit(1); });
"""

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def make_specs(count: int, kind: str) -> list[dict[str, Any]]:
    """The specs both sides add (snake_case, as kongtask takes them)."""
    if kind == "plain":
        return [{"identifier": "noop", "payload": {"id": n}} for n in range(count)]
    specs: list[dict[str, Any]] = []
    for n in range(count):
        spec: dict[str, Any] = {"identifier": f"task_{n % 4}", "payload": {"id": n}}
        if n % 3 == 0:
            spec["queue_name"] = f"queue_{n % 8}"
        if n % 5 == 0:
            spec["run_at"] = T0 + timedelta(seconds=n)
        if n % 7 == 0:
            spec["max_attempts"] = 5
        if n % 2 == 0:
            spec["priority"] = n % 10
        if n % 11 == 0:
            spec["flags"] = ["slow"]
        specs.append(spec)
    return specs


def node_specs(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same specs as graphile-worker's ``addJobs`` takes them (camelCase, ISO run_at)."""
    names = {"queue_name": "queueName", "run_at": "runAt", "max_attempts": "maxAttempts"}
    converted = []
    for spec in specs:
        item = {names.get(key, key): value for key, value in spec.items()}
        if "runAt" in item:
            item["runAt"] = item["runAt"].isoformat()
        converted.append(item)
    return converted


def add_kongtask(url: str, specs: list[dict[str, Any]], batch: int) -> float:
    """Seconds for ``WorkerUtils.add_jobs`` over the specs, ``batch`` per call."""
    from kongtask import WorkerUtils

    with WorkerUtils(url) as utils:
        utils.add_jobs([{"identifier": "warm_up"}])  # connected, statements parsed
        added = 0
        started = time.perf_counter()
        for start in range(0, len(specs), batch):
            added += len(utils.add_jobs(specs[start : start + batch]))
        seconds = time.perf_counter() - started
    if added != len(specs):
        raise SystemExit(f"kongtask added {added} of {len(specs)} jobs")
    return seconds


def add_graphile_worker(url: str, specs_file: Path, batch: int, gw: Path) -> float:
    """Seconds for graphile-worker's ``addJobs`` over the specs (timed inside Node)."""
    with tempfile.TemporaryDirectory(prefix="kongtask-bench-gw-") as cwd:
        os.symlink(gw / "node_modules", Path(cwd, "node_modules"))
        Path(cwd, "add_jobs.js").write_text(GW_ADD_JOBS)
        out = subprocess.run(
            ["node", "add_jobs.js", str(specs_file), str(batch)],
            cwd=cwd,
            env=dict(os.environ, DATABASE_URL=to_uri(url)),
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    return float(out.strip().splitlines()[-1])


def vacuumed(url: str) -> None:
    """An empty jobs table (and queue/task tables as the schema left them), vacuumed."""
    fresh_jobs_table(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("vacuum analyze graphile_worker._private_tasks")
        conn.execute("vacuum analyze graphile_worker._private_job_queues")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--jobs", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kind", choices=["plain", "mixed"], default="plain")
    parser.add_argument("--no-compare-graphile-worker", action="store_true")
    args = parser.parse_args()
    n, batch = args.jobs, args.batch_size
    specs = make_specs(n, args.kind)
    gw = None if args.no_compare_graphile_worker else graphile_worker_dir()
    print(
        f"settings: {n:,} {args.kind} specs in batches of {batch:,}, one connection per side, "
        f"jobs table truncated and vacuumed before every run, {args.rounds} rounds, order "
        f"alternated; graphile-worker {GRAPHILE_WORKER_VERSION} addJobs timed inside Node, "
        f"kongtask WorkerUtils.add_jobs timed around its calls; Python {sys.version.split()[0]}"
    )
    with scratch_database(server_url()) as url, tempfile.TemporaryDirectory() as tmp:
        with psycopg.connect(url) as conn:
            row = conn.execute("select current_setting('server_version')").fetchone()
        print(f"PostgreSQL {row[0] if row else '?'}")
        specs_file = Path(tmp, "specs.json")
        specs_file.write_text(json.dumps(node_specs(specs)))
        sides: dict[str, Any] = {"kongtask": lambda: add_kongtask(url, specs, batch)}
        if gw is not None:
            sides["graphile-worker"] = lambda: add_graphile_worker(url, specs_file, batch, gw)
        results: dict[str, list[float]] = {name: [] for name in sides}
        names = list(sides)
        for index in range(args.rounds):
            for name in names if index % 2 == 0 else names[::-1]:
                vacuumed(url)
                results[name].append(sides[name]())
        for name, seconds in results.items():
            best, median = summary(seconds)
            print(
                f"  {name}: best {n / best:,.0f} jobs/s, median {n / median:,.0f} jobs/s "
                f"(seconds {', '.join(f'{s:.3f}' for s in seconds)})"
            )
        if gw is not None:
            ours, theirs = summary(results["kongtask"]), summary(results["graphile-worker"])
            print(
                f"  ratio kongtask / graphile-worker: best {theirs[0] / ours[0]:.2f}x, "
                f"median {theirs[1] / ours[1]:.2f}x"
            )


if __name__ == "__main__":
    main()
