"""Web app benchmark: a request that stores a row and enqueues its job in one transaction.

Usage: ``python tools/bench_webapps.py [-n 500]``. Runs the two examples in
this process with their frameworks' test clients (no HTTP server, so the
numbers are kongtask's and the framework's, not a network's) on a scratch
database: ``examples/fastapi_app.py`` (lifespan Runner, concurrency 2) and
``examples/flask_app.py`` (then ``flask kongtask worker --once -j 4``). Prints
each request's latency percentiles and how long the jobs took to run.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools._bench_common import percentile, scratch_database, server_url


def _latencies(samples: list[float]) -> str:
    ordered = sorted(samples)
    return ", ".join(f"p{p} {percentile(ordered, p / 100) * 1000:.1f} ms" for p in (50, 95, 99))


def bench_fastapi(url: str, n: int) -> None:
    from fastapi.testclient import TestClient

    from examples.fastapi_app import create_app

    samples = []
    with TestClient(create_app(url)) as client, psycopg.connect(url, autocommit=True) as db:
        for i in range(n):
            started = time.perf_counter()
            response = client.post("/orders", params={"item": f"item {i}"})
            samples.append(time.perf_counter() - started)
            assert response.status_code == 200, response.text
        last = time.perf_counter()
        pause = threading.Event()
        while db.execute("select sent from receipt_counter").fetchone() != (n,):
            pause.wait(0.005)
        drained = time.perf_counter() - last
    print(f"FastAPI  POST /orders x {n}: {_latencies(samples)}")
    print(f"         all {2 * n} jobs done {drained * 1000:.0f} ms after the last response")


def bench_flask(url: str, n: int) -> None:
    from examples.flask_app import create_app

    app = create_app(url)
    assert app.test_cli_runner().invoke(args=["init-db"]).exit_code == 0
    client = app.test_client()
    samples = []
    for i in range(n):
        started = time.perf_counter()
        response = client.post("/orders", query_string={"item": f"item {i}"})
        samples.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
    started = time.perf_counter()
    result = app.test_cli_runner().invoke(args=["kongtask", "worker", "--once", "-j", "4"])
    took = time.perf_counter() - started
    assert result.exit_code == 0, result.output
    app.extensions["kongtask"].close()
    print(f"Flask    POST /orders x {n}: {_latencies(samples)}")
    print(f"         flask kongtask worker --once -j 4: {n} jobs in {took:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=500, help="requests per framework")
    args = parser.parse_args()
    print(f"settings: n={args.n}, Python {sys.version.split()[0]}, in-process test clients")
    with scratch_database(server_url()) as url:
        bench_fastapi(url, args.n)
    with scratch_database(server_url()) as url:
        bench_flask(url, args.n)


if __name__ == "__main__":
    main()
