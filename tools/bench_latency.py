"""Latency benchmark: add_job -> handler start, 1000 times in a row, on a live worker.

Usage: ``python tools/bench_latency.py [-n 1000] [--rounds 3] [--compare-graphile-worker]``.
A worker (concurrency 1, poll interval 2 s, defaults otherwise, on both sides)
runs in the measuring process; one separate connection calls the schema's
``add_job`` and the clock stops when the handler starts. 100 warm-up jobs are
not counted. With ``--compare-graphile-worker`` graphile-worker 0.17.3 is
measured the same way (a Node script with its own ``run()`` and one ``pg``
client) on the same database. Every round starts on a truncated, analyzed
jobs table; rounds alternate which side goes first, and the min and median
of each percentile over the rounds are printed.
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
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools._bench_common import (
    fresh_jobs_table,
    graphile_worker_dir,
    percentile,
    scratch_database,
    server_url,
    summary,
    to_uri,
)

WARMUP = 100

NODE_SCRIPT = r"""
const { run } = require("graphile-worker");
const { Client } = require("pg");
const [count, warmup] = [Number(process.argv[2]), Number(process.argv[3])];
let waiting = null;
async function main() {
  const runner = await run({
    connectionString: process.env.DATABASE_URL, concurrency: 1, noHandleSignals: true,
    pollInterval: 2000,
    taskList: {
      latency: async () => { const w = waiting; waiting = null; w(process.hrtime.bigint()); },
    },
  });
  const client = new Client({ connectionString: process.env.DATABASE_URL });
  await client.connect();
  const latencies = [];
  for (let i = 0; i < warmup + count; i++) {
    const started = new Promise((resolve) => { waiting = resolve; });
    const t0 = process.hrtime.bigint();
    await client.query(
      "select graphile_worker.add_job('latency', json_build_object('id', $1::int))", [i]);
    const t1 = await started;
    if (i >= warmup) latencies.push(Number(t1 - t0) / 1e6);
  }
  await client.end();
  await runner.stop();
  console.log(JSON.stringify(latencies));
}
main().catch((e) => { console.error(e); process.exit(1); });
"""


def kongtask_latencies(url: str, count: int) -> list[float]:
    from kongtask.runner import run

    started_at: list[float] = []
    started = threading.Event()

    def latency(payload: Any, helpers: Any) -> None:
        started_at.append(time.perf_counter())
        started.set()

    latencies: list[float] = []
    runner = run(tasks={"latency": latency}, connection_string=url, install_signal_handlers=False)
    try:
        runner.join(30)
        with psycopg.connect(url, autocommit=True) as conn:
            for i in range(WARMUP + count):
                started.clear()
                t0 = time.perf_counter()
                conn.execute(
                    "select graphile_worker.add_job('latency', json_build_object('id', %s::int))",
                    (i,),
                )
                if not started.wait(10):
                    raise SystemExit(f"job {i} did not start within 10 s")
                if i >= WARMUP:
                    latencies.append((started_at[-1] - t0) * 1000)
    finally:
        runner.stop(30)
    return latencies


def graphile_worker_latencies(url: str, count: int) -> list[float]:
    gw = graphile_worker_dir()
    with tempfile.TemporaryDirectory(prefix="kongtask-bench-gw-") as cwd:
        os.symlink(gw / "node_modules", Path(cwd, "node_modules"))
        Path(cwd, "latency.js").write_text(NODE_SCRIPT)
        env = dict(os.environ, DATABASE_URL=to_uri(url), NO_LOG_SUCCESS="1")
        out = subprocess.run(
            ["node", "latency.js", str(count), str(WARMUP)],
            cwd=cwd,
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    return [float(value) for value in json.loads(out.strip().splitlines()[-1])]


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50": percentile(ordered, 0.50),
        "p95": percentile(ordered, 0.95),
        "p99": percentile(ordered, 0.99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--count", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compare-graphile-worker", action="store_true")
    args = parser.parse_args()
    os.environ["NO_LOG_SUCCESS"] = "1"
    print(
        f"settings (both sides): concurrency 1, poll interval 2 s, {args.count} sequential "
        f"add_job calls after {WARMUP} warm-up, {args.rounds} rounds, order alternated"
    )
    with scratch_database(server_url()) as url:
        sides = {"kongtask": kongtask_latencies}
        if args.compare_graphile_worker:
            sides["graphile-worker"] = graphile_worker_latencies
        names = list(sides)
        results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
        for index in range(args.rounds):
            for name in names if index % 2 == 0 else names[::-1]:
                fresh_jobs_table(url)
                results[name].append(percentiles(sides[name](url, args.count)))
        medians: dict[str, dict[str, float]] = {}
        for name, rounds in results.items():
            parts = []
            medians[name] = {}
            for key in ("p50", "p95", "p99"):
                low, median = summary([r[key] for r in rounds])
                medians[name][key] = median
                parts.append(f"{key} min {low:.2f} median {median:.2f}")
            print(f"  {name} add_job -> start (ms): " + "; ".join(parts))
        if len(medians) == 2:
            ours, theirs = medians["kongtask"], medians["graphile-worker"]
            print(
                "  ratio kongtask / graphile-worker (median of rounds, lower is better): "
                + ", ".join(f"{key} {ours[key] / theirs[key]:.2f}x" for key in ours)
            )


if __name__ == "__main__":
    main()
