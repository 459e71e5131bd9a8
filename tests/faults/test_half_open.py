"""Every database wait has a deadline: half-open connections, a silent server, SIGTERM.

The worker reaches the test server (over TCP or its unix socket) through
:class:`~tests.faults.tcp_proxy.TcpProxy`.
Silencing the proxy makes every open connection half-open (the sockets stay
open, nothing gets through, nothing fails) while new connections still work:
the worker must notice by itself (statement deadline, LISTEN ping, pool
check) and carry on over new connections. SIGTERM must end a worker stuck
that way within the abort timeout plus a few seconds. A host that accepts
connections and never answers must give a clear error within the connect
timeout, without the password.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

import kongtask
from kongtask.errors import KongtaskError
from kongtask.settings import ConnectionSettings
from tests.conftest import to_uri

from .ledger import WorkerProcess, install_ledger, scalar, wait_until, write_tasks
from .tcp_proxy import SilentServer, TcpProxy, server_address

pytestmark = pytest.mark.faults

_KONGTASK = [sys.executable, "-m", "kongtask"]


def _add(db: psycopg.Connection[Any], n: int) -> None:
    db.execute("select graphile_worker.add_job('record', json_build_object('n', %s::int))", (n,))


def test_worker_recovers_from_half_open_connections(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    done: dict[int, float] = {}
    ran = threading.Condition()

    def record(payload: Any, helpers: Any) -> None:
        with ran:
            done[payload["n"]] = time.monotonic()
            ran.notify_all()

    statement_timeout_s, heartbeat_s = 2.0, 1.0
    with TcpProxy(server_address(db_url)) as proxy:
        runner = kongtask.run(
            tasks={"record": record},
            connection_string=proxy.through(db_url),
            concurrency=2,
            poll_interval_s=120.0,  # only NOTIFY (or a recovered LISTEN) can wake it
            statement_timeout_s=statement_timeout_s,
            heartbeat_interval_s=heartbeat_s,
            install_signal_handlers=False,
        )
        try:
            _add(db, 1)
            with ran:
                assert ran.wait_for(lambda: 1 in done, timeout=10), "job 1 should run at once"
            before = proxy.accepted
            silenced = proxy.silence()
            assert silenced >= 3  # the pool's sessions and the LISTEN connection
            added = time.monotonic()
            _add(db, 2)
            with ran:
                assert ran.wait_for(lambda: 2 in done, timeout=60), (
                    "the worker never recovered from its half-open connections"
                )
            recovered = done[2] - added
            # The job added next runs through the recovered LISTEN connection at once.
            _add(db, 3)
            with ran:
                assert ran.wait_for(lambda: 3 in done, timeout=10)
            again = done[3] - done[2]
            assert proxy.accepted > before, "recovery goes through new connections"
            print(
                f"\nhalf-open: {silenced} connections silenced; a job added then ran "
                f"{recovered:.2f}s later (statement_timeout_s={statement_timeout_s}, "
                f"heartbeat {heartbeat_s}s); the next one {again * 1000:.0f} ms after"
            )
            assert recovered < heartbeat_s + 4 * statement_timeout_s + 5
            assert runner.running
        finally:
            assert runner.stop(timeout=30)
    left = scalar(db, "select count(*) from graphile_worker._private_jobs")
    assert left == 0


def test_sigterm_ends_a_worker_whose_connections_went_silent(
    db_url: str, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    install_ledger(db)
    tasks = write_tasks(tmp_path)
    with TcpProxy(server_address(db_url)) as proxy:
        # Default timeouts (statement deadline 30 s), abort timeout 5 s.
        worker = WorkerProcess.cli(
            proxy.through(db_url),
            tasks,
            tmp_path / "worker.log",
            jobs=2,
            env={"KONGTASK_LEDGER_URL": to_uri(db_url)},
        )
        try:
            worker.wait_ready()
            db.execute(
                "select graphile_worker.add_job('work', "
                '\'{"n": 1, "ms": 1500, "mark_start": true}\'::json)'
            )
            wait_until(
                lambda: scalar(db, "select count(*) from ledger where phase = 'start'") == 1,
                timeout_s=30,
                what="the job to start",
            )
            # Its outcome will have nowhere to go: the completer's connection is dead.
            proxy.silence()
            started = time.monotonic()
            worker.send(signal.SIGTERM)
            code = worker.wait(60)
            took = time.monotonic() - started
            log = worker.log()
        finally:
            worker.close()
    print(f"\nSIGTERM with every connection half-open: exit {code} after {took:.2f}s")
    assert code == 0, log
    assert took < 5.0 + 8.0, log
    assert "got no answer" in log


def test_silent_server_fails_within_connect_timeout_without_the_password(
    tmp_path: Path,
) -> None:
    (tmp_path / "t.py").write_text("def noop(payload, helpers):\n    pass\n")
    with SilentServer() as server:
        url = f"postgresql://kt:SuperSecret123@127.0.0.1:{server.port}/app"
        started = time.monotonic()
        result = subprocess.run(
            [*_KONGTASK, "-c", url, "--connect-timeout", "2", "--tasks", str(tmp_path / "t.py")],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        took = time.monotonic() - started
        assert result.returncode == 1, result.stderr
        assert "timeout" in result.stderr and f"port={server.port}" in result.stderr
        assert "SuperSecret123" not in result.stderr + result.stdout
        # Python's start-up and imports come on top of the 2 s.
        assert took < 2 + 6, took

        # The admin commands too.
        admin = subprocess.run(
            [*_KONGTASK, "admin", "-c", url, "--connect-timeout", "2", "unlock-dead"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert admin.returncode == 1 and "within 2 s" in admin.stderr, admin.stderr
        assert "SuperSecret123" not in admin.stderr + admin.stdout

        # The API: WorkerUtils with a connect timeout.
        started = time.monotonic()
        settings = ConnectionSettings(connect_timeout_s=1)
        with pytest.raises((psycopg.OperationalError, KongtaskError)) as caught:
            kongtask.WorkerUtils(url, connection_settings=settings).open()
        assert time.monotonic() - started < 1 + 2
        assert "SuperSecret123" not in str(caught.value)
    print(
        f"\nsilent server: the CLI exited {result.returncode} after {took:.2f}s: "
        f"{result.stderr.strip()}"
    )
