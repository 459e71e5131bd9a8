"""A Runner configured by settings objects runs like one configured keyword by keyword."""

from __future__ import annotations

import signal
import threading
import urllib.request
from typing import Any

import psycopg

from kongtask import OpsSettings, WorkerSettings, run_once
from kongtask.testing import running

from .worker_support import DEADLINE_S, add_jobs_sql, jobs


def test_run_once_with_settings_runs_the_backlog_and_stops(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    ran: list[int] = []
    add_jobs_sql(db, [{"identifier": "work", "payload": {"n": n}} for n in range(3)])

    def work(payload: dict[str, Any], helpers: Any) -> None:
        ran.append(payload["n"])

    runner = run_once(
        tasks={"work": work},
        connection_string=db_url,
        settings=WorkerSettings(concurrency=2, install_signal_handlers=False),
    )
    assert runner.settings.once is True and runner.settings.concurrency == 2
    assert not runner.running
    assert sorted(ran) == [0, 1, 2]
    assert jobs(db) == []


def test_running_with_settings_leaves_signal_handlers_alone_and_serves_ops(
    db_url: str,
) -> None:
    before = signal.getsignal(signal.SIGTERM)
    done = threading.Event()

    def work(payload: dict[str, Any], helpers: Any) -> None:
        done.set()

    with running(
        tasks={"work": work},
        connection_string=db_url,
        settings=WorkerSettings(concurrency=2),
        ops=OpsSettings(metrics_port=0),
    ) as runner:
        assert runner.settings.install_signal_handlers is False
        assert signal.getsignal(signal.SIGTERM) is before
        runner.add_job("work", {})
        assert done.wait(DEADLINE_S)
        with urllib.request.urlopen(runner.ops_server.url + "/healthz", timeout=5) as answer:
            assert answer.status == 200
