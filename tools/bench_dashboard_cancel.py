"""Dashboard cancel benchmark: how long the Cancel button takes to stop a waiting and a running job.

Usage: ``python tools/bench_dashboard_cancel.py [--jobs 20]``.

Against a scratch database, a ``kongtask dashboard`` server on 127.0.0.1 and a
worker (``-j 1``) whose handler waits on its abort event. For each of
``--jobs`` rounds: a scheduled job is cancelled through ``POST
/actions/cancel`` (the figure is the POST's answer, the job then failed for
good), and a running job likewise (two figures from sending the POST: to the
worker's ``job:failed`` event, and to the job's row read back failed for good,
polled every millisecond on a connection of its own). The POSTs carry the
CSRF token, cookie and Origin a browser sends.
"""

from __future__ import annotations

import argparse
import http.client
import re
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg

import kongtask
from kongtask.ops.dashboard import DashboardServer
from tools._bench_common import percentile, scratch_database, server_url


class _Browser:
    """Sends a form the way a browser would: with the dashboard's cookie and Origin."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.cookie = ""
        self.csrf = ""

    def _send(self, method: str, path: str, body: str | None = None) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Host": f"127.0.0.1:{self.port}", "Origin": f"http://127.0.0.1:{self.port}"}
        if self.cookie:
            headers["Cookie"] = self.cookie
        if body is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            cookie = response.getheader("Set-Cookie")
            if cookie:
                self.cookie = cookie.split(";")[0]
            return response.status, response.read().decode()
        finally:
            conn.close()

    def open(self, path: str) -> None:
        status, page = self._send("GET", path)
        found = re.search(r'name="csrf" value="([^"]+)"', page)
        if status != 200 or found is None:
            raise SystemExit(f"GET {path}: {status}, no form on the page")
        self.csrf = found.group(1)

    def cancel(self, job_id: int) -> None:
        body = urlencode({"csrf": self.csrf, "job_id": job_id, "next": "/"})
        status, text = self._send("POST", "/actions/cancel", body)
        if status != 303:
            raise SystemExit(f"POST /actions/cancel: {status} {text[:200]}")


def _failed_for_good(conn: psycopg.Connection[Any], job_id: int) -> bool:
    row = conn.execute(
        "select locked_at is null and attempts >= max_attempts "
        "from graphile_worker._private_jobs where id = %s",
        (job_id,),
    ).fetchone()
    return bool(row and row[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=20)
    args = parser.parse_args()
    print(f"settings: {args.jobs} rounds, worker -j 1, dashboard on 127.0.0.1 (pool of 4)")
    started = threading.Event()
    failed = threading.Event()

    def waits(payload: Any, helpers: Any) -> None:
        started.set()
        helpers.abort_event.wait(60)

    def on_failed(sender: Any, **payload: Any) -> None:
        failed.set()

    waiting_s: list[float] = []
    running_s: list[float] = []
    stored_s: list[float] = []
    pause = threading.Event()
    with scratch_database(server_url()) as url:
        runner = kongtask.Runner(
            tasks={"waits": waits},
            connection_string=url,
            concurrency=1,
            install_signal_handlers=False,
        )
        kongtask.events.job_failed.connect(on_failed, sender=runner, weak=False)
        with (
            runner,
            DashboardServer(url, port=0) as server,
            psycopg.connect(url, autocommit=True) as watcher,
        ):
            browser = _Browser(server.port)
            for _ in range(args.jobs):
                later = runner.add_job("waits", {}, run_at=datetime.now(UTC) + timedelta(hours=1))
                browser.open(f"/jobs/{later.id}")
                sent = time.perf_counter()
                browser.cancel(later.id)
                waiting_s.append(time.perf_counter() - sent)

                started.clear()
                failed.clear()
                job = runner.add_job("waits", {})
                if not started.wait(30):
                    raise SystemExit("the job never started")
                browser.open(f"/jobs/{job.id}")
                sent = time.perf_counter()
                browser.cancel(job.id)
                if not failed.wait(30):
                    raise SystemExit("the cancelled running job never failed")
                running_s.append(time.perf_counter() - sent)
                while not _failed_for_good(watcher, job.id):
                    if time.perf_counter() - sent > 30:
                        raise SystemExit("the cancelled running job's row never failed")
                    pause.wait(0.001)
                stored_s.append(time.perf_counter() - sent)
        kongtask.events.job_failed.disconnect(on_failed)
    for name, values in (
        ("waiting job (POST answered)", waiting_s),
        ("running job (job:failed event)", running_s),
        ("running job (row failed for good)", stored_s),
    ):
        ordered = sorted(values)
        print(
            f"cancel a {name}: p50 {percentile(ordered, 0.5) * 1000:.1f} ms, "
            f"max {ordered[-1] * 1000:.1f} ms"
        )


if __name__ == "__main__":
    main()
