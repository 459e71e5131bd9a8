"""Latency benchmark: add_job -> handler start, 1000 times in a row, on a live worker.

Usage: ``python tools/bench_latency.py [-n 1000] [--compare-graphile-worker]``.
A worker (concurrency 1, defaults otherwise) runs in this process; one separate
connection calls the schema's ``add_job`` and the clock stops when the handler
starts. 100 warm-up jobs are not counted. With ``--compare-graphile-worker``
graphile-worker 0.17.3 is measured the same way (a Node script with its own
``run()`` and one ``pg`` client) on the same database.
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
    graphile_worker_dir,
    percentile,
    scratch_database,
    server_url,
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


def report(label: str, values: list[float]) -> float:
    ordered = sorted(values)
    p50 = percentile(ordered, 0.50)
    print(
        f"{label}: min {ordered[0]:.2f} / p50 {p50:.2f} / p95 {percentile(ordered, 0.95):.2f} / "
        f"p99 {percentile(ordered, 0.99):.2f} / max {ordered[-1]:.2f} ms "
        f"(avg {sum(ordered) / len(ordered):.2f}, n={len(ordered)})"
    )
    return p50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--count", type=int, default=1000)
    parser.add_argument("--compare-graphile-worker", action="store_true")
    args = parser.parse_args()
    os.environ["NO_LOG_SUCCESS"] = "1"
    with scratch_database(server_url()) as url:
        ours = report("kongtask add_job -> start", kongtask_latencies(url, args.count))
        if args.compare_graphile_worker:
            theirs = report(
                "graphile-worker 0.17.3 add_job -> start",
                graphile_worker_latencies(url, args.count),
            )
            print(f"p50 ratio kongtask / graphile-worker: {ours / theirs:.2f}x (lower is better)")


if __name__ == "__main__":
    main()
