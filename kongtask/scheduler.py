"""The public cron Scheduler: kongtask's distributed cron, with no job worker required.

A ``Scheduler`` schedules cron jobs into the queue exactly once per (identifier,
minute) across every kongtask and graphile-worker node on the schema; the jobs
are run by whatever workers serve those tasks, anywhere. It is what a Runner
uses for its own crontab, so there is one implementation. Like a Runner it is
configuration until :meth:`Scheduler.start` (or ``with``): the constructor
validates every argument and opens nothing.

Its items come from a crontab (text or file), from code (``cron_items``, which
may carry a ``condition``), and from the database (items added at run time with
:meth:`add_cron_item`, ``WorkerUtils.add_cron_item`` or ``kongtask cron add``,
which every kongtask cron node on the schema picks up within seconds: a NOTIFY,
and a periodic check for the connections that cannot LISTEN).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import psycopg
import pykka
from psycopg_pool import ConnectionPool

from kongtask import events
from kongtask.cron.parser import parse_cron_item
from kongtask.cron.service.cron_service import CronService
from kongtask.cron.service.store import (
    CronRun,
    ItemLike,
    StoredCronItem,
    add_stored_item,
    cron_history,
    list_stored_items,
    prune_history,
    remove_stored_item,
    to_parsed_item,
    update_stored_item,
)
from kongtask.cron.source import CrontabSource, check_unique_identifiers
from kongtask.cron.types import CronItem, ParsedCronItem
from kongtask.db.connecting import DEFAULT_CONNECTION_SETTINGS, connect, open_pool
from kongtask.db.conninfo import open_database, resolve_schema
from kongtask.db.migrate import migrate
from kongtask.db.statements import Queries
from kongtask.errors import ConfigurationError, KongtaskError
from kongtask.protocols import Clock
from kongtask.runtime.clock import SystemClock
from kongtask.runtime.os_signals import SignalHandlers, can_install
from kongtask.runtime.publisher import EventBus
from kongtask.validate import check_clock, check_seconds

__all__ = ["Scheduler"]

_LOGGER = logging.getLogger("kongtask.cron")
_POOL_OPEN_TIMEOUT_S = 30.0
_PRUNE_EVERY_S = 3600.0


class Scheduler:
    """kongtask's cron scheduler, embeddable on its own; see the module docstring.

    ``backfill_on_start=False`` makes this node never backfill; the minutes it moves
    ``last_execution`` past unscheduled are recorded, so a node that does backfill
    still fills them within its ``fill`` window. ``clock_skew_tolerance_s`` is how far
    this node's clock may differ from the database's ``now()`` before a
    ``cron:clockSkew`` event and a warning (and how late or early a minute timer may
    fire before ``cron:overdueTimer``/``cron:prematureTimer``). Events are sent with
    the Scheduler as the blinker sender.
    """

    def __init__(
        self,
        *,
        connection_string: str | None = None,
        pool: ConnectionPool[Any] | None = None,
        schema: str | None = None,
        crontab: str | None = None,
        crontab_file: str | Path | None = None,
        cron_items: Sequence[ItemLike] | None = None,
        backfill_on_start: bool = True,
        clock_skew_tolerance_s: float = 10.0,
        clock: Clock | None = None,
        logger: logging.Logger | None = None,
        install_signal_handlers: bool | None = None,
        stored_items: bool = True,
        stored_items_check_interval_s: float = 10.0,
        history_retention: timedelta = timedelta(days=30),
        node_name: str | None = None,
    ) -> None:
        if connection_string is not None and not isinstance(connection_string, str):
            raise ConfigurationError(
                "connection_string must be a string or None",
                name="connection_string",
                value=connection_string,
            )
        if pool is not None and connection_string is not None:
            raise ConfigurationError(
                "give connection_string or pool, not both", name="pool", value=pool
            )
        if pool is not None and not isinstance(pool, ConnectionPool):
            raise ConfigurationError(
                "pool must be a psycopg_pool.ConnectionPool", name="pool", value=pool
            )
        if crontab is not None and crontab_file is not None:
            raise ConfigurationError(
                "give at most one of crontab and crontab_file", name="crontab_file"
            )
        for name, value in (
            ("backfill_on_start", backfill_on_start),
            ("stored_items", stored_items),
        ):
            if not isinstance(value, bool):
                raise ConfigurationError(f"{name} must be True or False", name=name, value=value)
        check_seconds("clock_skew_tolerance_s", clock_skew_tolerance_s, minimum=0.0)
        check_seconds("stored_items_check_interval_s", stored_items_check_interval_s, minimum=0.1)
        if not isinstance(history_retention, timedelta) or history_retention <= timedelta(0):
            raise ConfigurationError(
                "history_retention must be a positive timedelta",
                name="history_retention",
                value=history_retention,
            )
        check_clock(clock)
        self._source = CrontabSource.of(crontab=crontab, crontab_file=crontab_file)
        self._code_items = _parse_code_items(cron_items)
        self._connection_string = connection_string
        self._host_pool = pool
        self.schema = resolve_schema(schema)
        self.backfill_on_start = backfill_on_start
        self.clock_skew_tolerance_s = float(clock_skew_tolerance_s)
        self._given_clock = clock
        self._log = logger or _LOGGER
        self._install_signals = install_signal_handlers
        self._use_stored = stored_items
        self._check_interval_s = float(stored_items_check_interval_s)
        self.history_retention = history_retention
        self.node_name = node_name or f"{socket.gethostname()}/{os.getpid()}/{id(self):x}"
        self._queries = Queries(self.schema)
        # Set by Runner (through _embed): its pool, bus and clock; no migration.
        self._emit: Callable[..., None] | None = None
        self._migrate = True
        self._preparsed: list[ParsedCronItem] | None = None
        # Run state.
        self._stack: ExitStack | None = None
        self._pool: ConnectionPool[Any] | None = None
        self._clock: Clock | None = None
        self._service: CronService | None = None
        self._stopped = threading.Event()
        self._stop_watch = threading.Event()
        self._watch_thread: threading.Thread | None = None
        self._listen_conn: psycopg.Connection[Any] | None = None
        self._control: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._signals: SignalHandlers | None = None
        self._control_thread: threading.Thread | None = None
        self._skewed = False
        self.clock_skew_s: float | None = None
        """The last measured difference between the database's clock and this node's
        (positive: this node is ahead), or None before the first measurement."""

    @classmethod
    def _embed(
        cls,
        *,
        pool: ConnectionPool[Any],
        schema: str,
        source: CrontabSource | None,
        items: list[ParsedCronItem] | None,
        clock: Clock,
        emit: Callable[..., None],
        node_name: str,
    ) -> Scheduler:
        """The Scheduler of a Runner: the Runner's pool, clock and events, no signals."""
        code = list(source.items) if source is not None and source.items is not None else []
        file_or_text = None if source is None or source.items is not None else source
        scheduler = cls(pool=pool, schema=schema, clock=clock, node_name=node_name,
                        install_signal_handlers=False, cron_items=code)  # fmt: skip
        scheduler._source = file_or_text
        scheduler._preparsed = items if file_or_text is not None else None
        scheduler._emit = emit
        scheduler._migrate = False
        return scheduler

    # --- lifecycle ----------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True between a successful start and the end of stop()."""
        return self._service is not None and not self._stopped.is_set()

    def start(self) -> Self:
        """Parse the crontab, connect, migrate, start scheduling; returns at once.

        A bad crontab raises ``CrontabError`` before anything connects.
        """
        if self._stack is not None:
            raise KongtaskError("this Scheduler was already started; make a new one")
        items = self._preparsed
        if items is None:
            items = self._source.load() if self._source is not None else []
        self._stack = ExitStack()
        try:
            self._start(items)
        except BaseException:
            self._teardown()
            raise
        return self

    def _start(self, items: list[ParsedCronItem]) -> None:
        stack = self._stack
        assert stack is not None
        if self._host_pool is not None:
            self._pool = self._host_pool
            if self._migrate:
                with self._pool.connection() as conn:
                    conn.commit()  # migrate() wants no transaction in progress
                    migrate(conn, self.schema)
        else:
            conninfo = stack.enter_context(open_database(self._connection_string))
            with connect(conninfo) as conn:
                migrate(conn, self.schema)
            pool = open_pool(
                conninfo,
                DEFAULT_CONNECTION_SETTINGS,
                name=f"kongtask-scheduler-{self.schema}"[:63],
                min_size=1,
                max_size=3,
                deadline_s=DEFAULT_CONNECTION_SETTINGS.statement_timeout_s,
                open_timeout_s=_POOL_OPEN_TIMEOUT_S,
            )
            stack.callback(pool.close)
            self._pool = pool
        if self._emit is None:
            bus = EventBus(self)
            bus.start()
            stack.callback(bus.stop)
            self._emit = bus.emit
        if self._given_clock is not None:
            self._clock = self._given_clock
        else:
            clock = SystemClock(name="kongtask-scheduler-clock")
            stack.callback(clock.close)
            self._clock = clock
        stored = [s.item for s in self._read_stored()] if self._use_stored else []
        service = CronService(
            source=self._source,
            clock=self._clock,
            connect=self._pool.connection,
            queries=self._queries,
            emit=self._emit,
            code_items=self._code_items,
            backfill_on_start=self.backfill_on_start,
            node=self.node_name,
            overdue_tolerance_s=self.clock_skew_tolerance_s,
        )
        service.start(items, stored=stored)
        self._service = service
        stack.callback(service.stop)
        self._measure_skew()
        self._watch_thread = threading.Thread(
            target=self._watch, name="kongtask-scheduler-watch", daemon=True
        )
        self._watch_thread.start()
        if self._install_signals is not False and can_install():
            self._signals = SignalHandlers(self._control)
            self._signals.install()
        self._control_thread = threading.Thread(
            target=self._control_loop, name="kongtask-scheduler-control", daemon=True
        )
        self._control_thread.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Stop scheduling and release what this Scheduler opened; True once stopped.

        A host's own pool is never closed.
        """
        if self._stack is None:
            return True
        self._control.put(("stop", None))
        stopped = self._stopped.wait(timeout)
        if stopped and self._signals is not None:
            self._signals.remove()
            self._signals = None
        return stopped

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the Scheduler has stopped (a signal or stop()); False on timeout."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> Self:
        if self._stack is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _control_loop(self) -> None:
        while True:
            kind, value = self._control.get()
            if kind == "signal" and value == signal.SIGHUP:
                self._log.info("SIGHUP received; reloading the crontab")
                self.request_reload()
                continue
            if kind == "signal":
                self._log.info(
                    "Received %s; stopping the cron scheduler", signal.Signals(value).name
                )
            self._teardown()
            return

    def _teardown(self) -> None:
        self._stop_watch.set()
        conn = self._listen_conn
        if conn is not None:
            try:
                conn.close()  # interrupts a notifies() wait
            except Exception:  # pragma: no cover - closing is best effort
                pass
        if self._watch_thread is not None and self._watch_thread is not threading.current_thread():
            self._watch_thread.join(10.0)
        stack, self._stack = self._stack, ExitStack()
        try:
            if stack is not None:
                stack.close()
        except Exception:
            self._log.exception("Releasing the cron scheduler's resources failed")
        self._service = None
        self._stopped.set()

    def parts(self) -> dict[str, pykka.ActorRef[Any]]:
        """The cron actors by name, for a liveness probe to ask; empty unless running."""
        service = self._service
        return service.parts() if service is not None else {}

    # --- the live items ---------------------------------------------------------

    def get_cron_items(self) -> list[ParsedCronItem]:
        """The items being scheduled now (crontab, code and stored items)."""
        return self._running_service().items()

    def reload_cron_items(self, items: Sequence[ItemLike] | None = None) -> bool:
        """``None``: re-read the crontab file (or text) given; a list: replace the code items.

        True if the change took effect; False (the previous schedule kept, the error
        logged and ``cron:reloadFailed`` emitted) if it did not.
        """
        service = self._running_service()
        if items is None:
            return service.reload()
        return service.set_code_items(_parse_code_items(items))

    def reload(self, timeout_s: float | None = 30.0) -> bool:
        """Re-read the crontab (what SIGHUP does); see :meth:`reload_cron_items`."""
        return self._running_service().reload(timeout_s)

    def request_reload(self) -> None:
        """Ask for a crontab reload without waiting (safe from any thread)."""
        if self._service is not None:
            self._service.request_reload()

    def _running_service(self) -> CronService:
        if self._service is None or self._stopped.is_set():
            raise KongtaskError("the Scheduler is not running; start it first")
        return self._service

    # --- stored items (fleet-wide) ------------------------------------------------

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        if self._pool is None:
            raise KongtaskError("the Scheduler is not running; start it first")
        with self._pool.connection() as conn:
            yield conn

    def add_cron_item(self, item: ItemLike) -> StoredCronItem:
        """Store an item for every kongtask cron node on this schema (survives restarts).

        Raises ``ConfigurationError`` if this node already has the identifier (from its
        crontab, its code items or the database).
        """
        parsed = to_parsed_item(item)
        live = {i.identifier: i for i in self.get_cron_items()}
        if parsed.identifier in live and live[parsed.identifier].origin != "stored":
            raise ConfigurationError(
                f"cron identifier {parsed.identifier!r} is already used by this"
                f" Scheduler's {live[parsed.identifier].origin} items",
                name="identifier",
                value=parsed.identifier,
            )
        with self._connection() as conn:
            stored = add_stored_item(conn, self._queries, parsed)
        self.refresh_stored_items()
        return stored

    def update_cron_item(self, item: ItemLike) -> StoredCronItem:
        """Replace a stored item (same identifier) on every node."""
        with self._connection() as conn:
            stored = update_stored_item(conn, self._queries, item)
        self.refresh_stored_items()
        return stored

    def remove_cron_item(self, identifier: str) -> bool:
        """Remove a stored item from every node; False if there was none."""
        with self._connection() as conn:
            removed = remove_stored_item(conn, self._queries, identifier)
        self.refresh_stored_items()
        return removed

    def list_cron_items(self) -> list[StoredCronItem]:
        """The stored items (not the crontab or code items: see :meth:`get_cron_items`)."""
        return self._read_stored()

    def refresh_stored_items(self) -> bool:
        """Read the stored items now and apply any change (the watcher does this too)."""
        if not self._use_stored:
            return True
        service = self._running_service()
        return service.set_stored_items([s.item for s in self._read_stored()])

    def _read_stored(self) -> list[StoredCronItem]:
        with self._connection() as conn:
            return list_stored_items(conn, self._queries)

    def lag_s(self) -> float | None:
        """How far this node's cron is behind: seconds since the minute it must handle next.

        0 while it keeps up (the next minute is still ahead); ``None`` before
        the minute loop runs (while registering and backfilling) or when stopped.
        Read by the ``/readyz`` probe.
        """
        service, clock = self._service, self._clock
        if service is None or clock is None:
            return None
        return service.progress.lag_s(clock.now())

    def wait_caught_up(self, timeout_s: float = 30.0) -> bool:
        """Wait until every minute up to this node's clock has been scheduled (the jobs
        of passed minutes exist); False on timeout or when not running."""
        service, clock = self._service, self._clock
        if service is None or clock is None:
            return False
        return service.progress.wait_caught_up(clock.now, timeout_s)

    # --- history --------------------------------------------------------------------

    def history(
        self,
        identifier: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
    ) -> list[CronRun]:
        """Recorded firings, newest first: when each ran, on which node, and how it went."""
        with self._connection() as conn:
            return cron_history(
                conn, self._queries, identifier=identifier, since=since, until=until, limit=limit
            )

    # --- the watcher: stored items, clock skew, retention ---------------------------

    def _watch(self) -> None:
        last_prune: float | None = None
        while not self._stop_watch.is_set():
            notified = self._wait_for_notice()
            if self._stop_watch.is_set():
                return
            try:
                if self._use_stored:
                    self.refresh_stored_items()
                if not notified:
                    self._measure_skew()
                    monotonic = self._clock.monotonic() if self._clock else 0.0
                    if last_prune is None or monotonic - last_prune >= _PRUNE_EVERY_S:
                        last_prune = monotonic
                        self._prune()
            except Exception as exc:  # never let the watcher die: the next round retries
                if not self._stop_watch.is_set():
                    self._log.warning("Cron scheduler check failed: %s", exc)

    def _wait_for_notice(self) -> bool:
        """Wait up to the check interval for a stored-items NOTIFY; True if one came."""
        interval = self._check_interval_s
        if not self._use_stored or self._pool is None:
            self._stop_watch.wait(interval)
            return False
        try:
            if self._listen_conn is None or self._listen_conn.closed:
                conninfo = self._pool.conninfo
                conninfo = conninfo() if callable(conninfo) else conninfo
                conn = psycopg.connect(conninfo, autocommit=True)
                conn.execute(self._queries.listen_cron_items)
                self._listen_conn = conn
                if self._stop_watch.is_set():
                    # Stopping began while this connected; the teardown closed
                    # the previous connection, not this one.
                    conn.close()
                    return False
            for notice in self._listen_conn.notifies(timeout=interval, stop_after=1):
                return notice.payload == self.schema
            return False
        except psycopg.Error as exc:
            if not self._stop_watch.is_set():
                self._log.warning(
                    "Cannot LISTEN for cron item changes (%s); checking every %ss", exc, interval
                )
                self._listen_conn = None
                self._stop_watch.wait(interval)
            return False

    def _measure_skew(self) -> None:
        clock = self._clock
        if clock is None or self._pool is None:
            return
        with self._connection() as conn:
            before = clock.now()
            row = conn.execute(self._queries.database_clock).fetchone()
            after = clock.now()
        assert row is not None
        local = before + (after - before) / 2
        skew = (local - row[0]).total_seconds()
        self.clock_skew_s = skew
        over = abs(skew) > self.clock_skew_tolerance_s
        if over and not self._skewed:
            self._log.warning(
                "This node's clock is %.1fs %s the database's (tolerance %.1fs): cron minutes"
                " will be scheduled early or late here; fix the clock (NTP)",
                abs(skew),
                "ahead of" if skew > 0 else "behind",
                self.clock_skew_tolerance_s,
            )
            assert self._emit is not None
            self._emit(events.cron_clock_skew, skew_s=skew, tolerance_s=self.clock_skew_tolerance_s)
        self._skewed = over

    def _prune(self) -> None:
        with self._connection() as conn:
            row = conn.execute(self._queries.ping).fetchone()
            assert row is not None
            removed = prune_history(conn, self._queries, row[0] - self.history_retention)
        if removed:
            self._log.info(
                "Pruned %d cron history row(s) older than %s", removed, self.history_retention
            )


def _parse_code_items(items: Sequence[ItemLike] | None) -> list[ParsedCronItem]:
    if items is None:
        return []
    if isinstance(items, str | Mapping) or not isinstance(items, Sequence):
        raise ConfigurationError(
            "cron_items must be a list of items", name="cron_items", value=items
        )
    parsed: list[ParsedCronItem] = []
    for index, item in enumerate(items):
        if isinstance(item, ParsedCronItem):
            parsed.append(item)
        elif isinstance(item, CronItem | Mapping):
            parsed.append(parse_cron_item(item, f"item {index} of cron_items"))
        else:
            raise ConfigurationError(
                f"cron_items[{index}] is not a cron item; use kongtask.CronItem, a mapping or"
                " kongtask.parse_cron_items()",
                name="cron_items",
                value=item,
            )
    check_unique_identifiers(parsed)
    return parsed
