"""Helpers for cron tests that run many schedulers on one database.

Three tools, used by the interop and fault suites:

- an **audit** installed into a test database: a trigger on ``_private_jobs``
  writes every cron firing (a job inserted, or a ``jobKey`` job replaced)
  with the ``application_name`` of the session that wrote it, and a trigger on
  ``_private_known_crontabs`` writes every attempt to claim a minute (the
  upsert proposes a row before the conflict check, so losers are seen too).
  Outcomes are read from these tables, never from logs;
- :func:`exactly_once_problems`, which compares the firings with the minutes
  each item should have fired at (computed by kongtask's matcher);
- :class:`Peer`, a worker process (kongtask's CLI or Node graphile-worker's)
  whose output is collected by a thread, so a test can wait for its ready line.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from kongtask.cron.matcher import fire_times
from kongtask.cron.types import ParsedCronItem

__all__ = [
    "Firing",
    "Fleet",
    "Peer",
    "Window",
    "attempts_by_writer",
    "exactly_once_problems",
    "firings",
    "install_audit",
    "prime_known_crontabs",
    "utc_now",
    "wait_until",
    "writers_attempting",
]

# The audit lives in its own schema; the queue's schema is graphile_worker.
_AUDIT_DDL = """
create schema cron_audit;
create table cron_audit.firings (
    seq bigserial primary key,
    job_id bigint not null,
    task text not null,
    ts text not null,
    backfilled boolean,
    revision int not null,
    writer text not null,
    recorded_at timestamptz not null default clock_timestamp()
);
create table cron_audit.attempts (
    seq bigserial primary key,
    identifier text not null,
    ts timestamptz not null,
    writer text not null
);
create function cron_audit.record_firing() returns trigger language plpgsql as $$
begin
    if new.payload -> '_cron' is null then
        return null;
    end if;
    if tg_op = 'UPDATE' and new.revision = old.revision then
        return null;
    end if;
    insert into cron_audit.firings (job_id, task, ts, backfilled, revision, writer)
    select new.id, tasks.identifier, new.payload -> '_cron' ->> 'ts',
        (new.payload -> '_cron' ->> 'backfilled')::boolean, new.revision,
        current_setting('application_name')
    from graphile_worker._private_tasks as tasks
    where tasks.id = new.task_id;
    return null;
end
$$;
create trigger cron_audit_firings
    after insert or update on graphile_worker._private_jobs
    for each row execute function cron_audit.record_firing();
create function cron_audit.record_attempt() returns trigger language plpgsql as $$
begin
    -- Every scheduling transaction proposes a row per identifier first (Node's
    -- upsert with the minute as known_since and last_execution, kongtask's
    -- "ensure known" with the minute as known_since); registrations propose
    -- rows with the start time. Proposals are seen before the conflict check.
    insert into cron_audit.attempts (identifier, ts, writer)
    values (new.identifier, new.known_since, current_setting('application_name'));
    return new;
end
$$;
create trigger cron_audit_attempts
    before insert on graphile_worker._private_known_crontabs
    for each row execute function cron_audit.record_attempt();
"""


def install_audit(conninfo: str) -> None:
    """Add the audit schema and triggers to a migrated (default schema) database."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(_AUDIT_DDL)


def prime_known_crontabs(
    conninfo: str, rows: Mapping[str, tuple[datetime, datetime | None]]
) -> None:
    """Record identifiers as known (``identifier -> (known_since, last_execution)``)."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        for identifier, (since, last) in rows.items():
            conn.execute(
                "insert into graphile_worker._private_known_crontabs "
                "(identifier, known_since, last_execution) values (%s, %s, %s)",
                (identifier, since, last),
            )


@dataclass(frozen=True, slots=True)
class Firing:
    """One cron job written (or replaced, for ``jobKey`` items) by one session."""

    task: str
    ts: datetime
    backfilled: bool | None
    writer: str
    job_id: int
    revision: int


def firings(conninfo: str) -> list[Firing]:
    """Every firing the audit recorded, in commit order."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        rows = conn.execute(
            "select task, ts, backfilled, writer, job_id, revision "
            "from cron_audit.firings order by seq"
        ).fetchall()
    return [
        Firing(task, datetime.fromisoformat(ts), backfilled, writer, job_id, revision)
        for task, ts, backfilled, writer, job_id, revision in rows
    ]


def attempts_by_writer(conninfo: str) -> dict[str, int]:
    """How many rows each session proposed to ``_private_known_crontabs`` (registrations
    and scheduling transactions, won or lost)."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        rows = conn.execute(
            "select writer, count(*) from cron_audit.attempts group by writer"
        ).fetchall()
    return {writer: int(count) for writer, count in rows}


def writers_attempting(conn: psycopg.Connection[Any], minute: datetime) -> set[str]:
    """The sessions that tried to schedule some identifier at ``minute``."""
    rows = conn.execute(
        "select distinct writer from cron_audit.attempts where ts = %s", (minute,)
    ).fetchall()
    return {writer for (writer,) in rows}


@dataclass(frozen=True, slots=True)
class Window:
    """The minutes an item must have fired at: every match in ``[start, end)``.

    Matches in ``[optional_start, start)`` and ``[end, optional_end)`` may be there
    or not (an item added by a reload, whose first minute depends on which
    process reloaded first; the minute the processes were stopped in); any other
    minute is wrong, and no minute may be there twice.
    """

    start: datetime
    end: datetime
    optional_start: datetime | None = None
    optional_end: datetime | None = None


def exactly_once_problems(
    fired: Iterable[Firing],
    items: Mapping[str, ParsedCronItem],
    windows: Mapping[str, Window],
) -> list[str]:
    """Every way ``fired`` differs from one firing per (item, due minute); ``[]`` if none."""
    by_task: dict[str, Counter[datetime]] = {}
    for firing in fired:
        by_task.setdefault(firing.task, Counter())[firing.ts] += 1
    problems: list[str] = []
    for task in sorted(set(by_task) - set(items)):
        problems.append(f"{task}: fired but is in no crontab")
    for identifier, item in items.items():
        window = windows[identifier]
        seen = by_task.get(item.task, Counter())
        required = set(fire_times(item, window.start, window.end))
        allowed = set(required)
        if window.optional_start is not None:
            allowed |= set(fire_times(item, window.optional_start, window.start))
        if window.optional_end is not None:
            allowed |= set(fire_times(item, window.end, window.optional_end))
        doubled = sorted(ts for ts, n in seen.items() if n > 1)
        missing = sorted(required - set(seen))
        stray = sorted(set(seen) - allowed)
        if doubled:
            problems.append(f"{identifier}: fired more than once at {_minutes(doubled)}")
        if missing:
            problems.append(f"{identifier}: never fired at {_minutes(missing)}")
        if stray:
            problems.append(f"{identifier}: fired outside its window at {_minutes(stray)}")
    return problems


def _minutes(times: Sequence[datetime]) -> str:
    shown = ", ".join(t.strftime("%m-%d %H:%M") for t in times[:8])
    return shown + (f" and {len(times) - 8} more" if len(times) > 8 else "")


def wait_until(
    conninfo: str, predicate: Callable[[psycopg.Connection[Any]], bool], timeout_s: float
) -> None:
    """Wait (on ``jobs:insert`` notifications, re-checking at least every second) until
    ``predicate(conn)`` holds; ``TimeoutError`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute('listen "jobs:insert"')
        while not predicate(conn):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"condition not met within {timeout_s}s")
            for _ in conn.notifies(timeout=min(1.0, remaining), stop_after=1):
                pass


_KONGTASK_READY = re.compile(r"Worker connected and looking for jobs\.\.\. \(pool (\S+),")
_NODE_READY = re.compile(r"Worker connected and looking for jobs")


class Peer:
    """One worker process with its output collected; signal it, kill it, wait for it.

    ``writer`` is the ``application_name`` its cron writes are recorded under:
    kongtask announces its pool id (read from its ready line), Node uses
    ``PGAPPNAME``, which the constructor sets to ``name``.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cwd: str | os.PathLike[str],
        ready: re.Pattern[str],
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.writer: str = name
        self.started_at = utc_now()
        self._lines: list[str] = []
        self._ready_pattern = ready
        self._changed = threading.Condition()
        self._ended = False
        full_env = {**os.environ, **(env or {}), "PGAPPNAME": name}
        full_env.pop("GRAPHILE_WORKER_SCHEMA", None)
        self.process = subprocess.Popen(
            self.argv,
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, name=f"peer-{name}", daemon=True)
        self._reader.start()

    @classmethod
    def kongtask(cls, name: str, uri: str, *, crontab: Path, tasks: Path, cwd: Path) -> Peer:
        """``kongtask -c URI --tasks TASKS --crontab CRONTAB``."""
        argv = [sys.executable, "-m", "kongtask", "-c", uri, "--tasks", str(tasks)]
        return cls(name, [*argv, "--crontab", str(crontab)], cwd=cwd, ready=_KONGTASK_READY)

    @classmethod
    def node(cls, name: str, cli: Sequence[str], uri: str, *, crontab: Path, cwd: Path) -> Peer:
        """graphile-worker's CLI; ``cwd`` must hold its ``tasks`` folder."""
        argv = [*cli, "-c", uri, "--crontab", str(crontab)]
        return cls(name, argv, cwd=cwd, ready=_NODE_READY)

    @property
    def is_kongtask(self) -> bool:
        """True for a kongtask process (it reloads on SIGHUP; Node shuts down)."""
        return self._ready_pattern is _KONGTASK_READY

    def _read(self) -> None:
        stream = self.process.stdout
        assert stream is not None
        for line in stream:
            with self._changed:
                self._lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        stream.close()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def mark(self) -> int:
        """A position in the output; :meth:`wait_for_line` can look only after it."""
        with self._changed:
            return len(self._lines)

    def wait_for_line(self, pattern: re.Pattern[str], *, after: int = 0, timeout_s: float) -> str:
        """The first output line after ``after`` matching ``pattern``, waiting up to
        ``timeout_s``; raises with the output if it does not come (or the process ends)."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                for line in self._lines[after:]:
                    if pattern.search(line):
                        return line
                after = len(self._lines)
                remaining = deadline - time.monotonic()
                if self._ended or remaining <= 0:
                    break
                self._changed.wait(remaining)
        raise AssertionError(
            f"{self.name}: no line matching {pattern.pattern!r} "
            f"({'exited ' + str(self.process.poll()) if self._ended else 'timed out'}):\n"
            f"{self.output()}"
        )

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Wait for the ready line (and learn the kongtask pool id from it)."""
        line = self.wait_for_line(self._ready_pattern, timeout_s=timeout_s)
        found = self._ready_pattern.search(line)
        if found is not None and found.groups():
            self.writer = found.group(1)

    def send(self, signum: signal.Signals) -> None:
        """Send ``signum`` to the process (if it still runs)."""
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def wait_exit(self, timeout_s: float = 30.0) -> int:
        """Wait for the exit (SIGKILL and fail after ``timeout_s``); the exit code."""
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} did not exit:\n{self.output()}") from None
        self._reader.join(timeout_s)
        return code

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._reader.join(10)

    def output(self) -> str:
        """The last lines the process printed."""
        with self._changed:
            return "\n".join(self._lines[-60:])


class Fleet:
    """Worker processes sharing one database and one crontab file, under a test folder.

    ``start("k1")`` runs a kongtask CLI named ``k1``; names starting with ``node``
    run graphile-worker (``node_cli`` must be given). A name can be started again
    after its process was killed; every incarnation is remembered, so
    :meth:`writer_names` maps each recorded writer back to a name.
    """

    def __init__(self, root: Path, uri: str, crontab: str, node_cli: Sequence[str] | None) -> None:
        self.root = root
        self.uri = uri
        self.crontab = root / "crontab"
        self.crontab.write_text(crontab, encoding="utf-8")
        self.tasks = root / "tasks.py"
        self.tasks.write_text("def kt_noop(payload, helpers):\n    return None\n", encoding="utf-8")
        self.node_cwd = root / "node"
        (self.node_cwd / "tasks").mkdir(parents=True)
        (self.node_cwd / "tasks" / "node_noop.js").write_text(
            "module.exports = async () => {};\n", encoding="utf-8"
        )
        self.node_cli = list(node_cli) if node_cli is not None else None
        self.live: dict[str, Peer] = {}
        self.every: list[Peer] = []
        self._incarnations: Counter[str] = Counter()

    def start(self, name: str, *, wait: bool = True) -> Peer:
        """Start the process called ``name`` (waiting for its ready line with ``wait``)."""
        if name in self.live and self.live[name].process.poll() is None:
            raise AssertionError(f"{name} is already running")
        self._incarnations[name] += 1
        label = f"{name}.{self._incarnations[name]}"
        if name.startswith("node"):
            assert self.node_cli is not None, "this fleet has no Node peer"
            peer = Peer.node(
                label, self.node_cli, self.uri, crontab=self.crontab, cwd=self.node_cwd
            )
        else:
            peer = Peer.kongtask(
                label, self.uri, crontab=self.crontab, tasks=self.tasks, cwd=self.root
            )
        self.live[name] = peer
        self.every.append(peer)
        if wait:
            peer.wait_ready()
        return peer

    def start_all(self, names: Iterable[str]) -> None:
        """Start several processes at once (so their startups and backfills overlap),
        then wait until each is ready."""
        peers = [self.start(name, wait=False) for name in names]
        for peer in peers:
            peer.wait_ready()

    def kill(self, name: str) -> None:
        """SIGKILL the process called ``name``."""
        self.live.pop(name).kill()

    def stop_all(self) -> dict[str, int]:
        """SIGTERM every live process at once, then wait for each; their exit codes."""
        peers, self.live = self.live, {}
        for peer in peers.values():
            peer.send(signal.SIGTERM)
        return {name: peer.wait_exit() for name, peer in peers.items()}

    def kill_everything(self) -> None:
        """SIGKILL whatever still runs (the test's cleanup)."""
        for peer in self.every:
            peer.kill()
        self.live = {}

    def writer_names(self) -> dict[str, str]:
        """``application_name`` -> process label, for every incarnation."""
        return {peer.writer: peer.name for peer in self.every}


def utc_now() -> datetime:
    """The real time (these tests run real processes against the real clock)."""
    return datetime.now(UTC)
