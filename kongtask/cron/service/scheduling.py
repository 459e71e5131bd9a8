"""The cron service a host runs: the cron actors and the watcher thread.

:class:`SchedulingService` starts the cron actors (:class:`CronService`) on a
host's pool, bus and clock, and a watcher thread that picks up stored items
(a NOTIFY, and a periodic check for connections that cannot LISTEN),
measures the clock skew against the database and prunes the cron history.
The public :class:`kongtask.Scheduler` and a Runner's crontab both run it.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import psycopg

from kongtask import events
from kongtask.cron.service.cron_service import CronService
from kongtask.cron.service.store import StoredCronItem, list_stored_items, prune_history
from kongtask.cron.source import CrontabSource
from kongtask.cron.types import ParsedCronItem
from kongtask.db.connecting import DEFAULT_CONNECTION_SETTINGS, connect
from kongtask.db.statements import Queries
from kongtask.errors import KongtaskError
from kongtask.runtime.control import ControlMessage, OsSignal
from kongtask.runtime.host import Host
from kongtask.runtime.parts import ActorPart, Part, ThreadsPart

__all__ = ["SchedulingService"]

_PRUNE_EVERY_S = 3600.0
# A quiet LISTEN wait lasts one check interval; its deadline allows that and this.
_DEADLINE_MARGIN_S = 5.0


class SchedulingService:
    """Cron on a host: the actors, the watcher, and the stored items' reads."""

    name = "cron"

    def __init__(
        self,
        *,
        schema: str,
        source: CrontabSource | None,
        items: list[ParsedCronItem] | None,
        code_items: Sequence[ParsedCronItem],
        backfill_on_start: bool,
        clock_skew_tolerance_s: float,
        stored_items: bool,
        check_interval_s: float,
        history_retention: timedelta,
        node_name: str,
        log: logging.Logger,
        announce_signals: bool,
    ) -> None:
        self.schema = schema
        self.queries = Queries(schema)
        self.backfill_on_start = backfill_on_start
        self.clock_skew_tolerance_s = clock_skew_tolerance_s
        self.use_stored = stored_items
        self.check_interval_s = check_interval_s
        self.history_retention = history_retention
        self.node_name = node_name
        self.log = log
        self._source = source
        self._items = items
        self._code_items = list(code_items)
        self._announce_signals = announce_signals
        self._host: Host | None = None
        self.actors: CronService | None = None
        self._stopped = threading.Event()
        self._watch_thread: threading.Thread | None = None
        self._listen_conn: psycopg.Connection[Any] | None = None
        self._skewed = False
        #: The last measured difference between the database's clock and this node's
        #: (positive: this node is ahead), or None before the first measurement.
        self.clock_skew_s: float | None = None

    @property
    def code_items(self) -> list[ParsedCronItem]:
        """The items given in code."""
        return list(self._code_items)

    def preload(self) -> None:
        """Parse the crontab now (raises ``CrontabError``), before anything connects."""
        if self._items is None:
            self._items = self._source.load() if self._source is not None else []

    def wait_stopped(self, timeout_s: float | None) -> bool:
        """Block until this service has stopped; False on timeout."""
        return self._stopped.wait(timeout_s)

    # --- the service protocol ---------------------------------------------------------

    def start(self, host: Host) -> None:
        """Read the stored items, start the cron actors and the watcher."""
        self._host = host
        self.preload()
        items = self._items
        assert items is not None
        stored = [s.item for s in self.read_stored()] if self.use_stored else []
        pool = host.pool
        assert pool is not None, "the host opens the pool first"
        actors = CronService(
            source=self._source,
            clock=host.clock,
            connect=pool.connection,
            queries=self.queries,
            emit=host.bus.emit,
            code_items=self._code_items,
            backfill_on_start=self.backfill_on_start,
            node=self.node_name,
            overdue_tolerance_s=self.clock_skew_tolerance_s,
        )
        self.actors = actors
        actors.start(items, stored=stored)
        self._measure_skew()
        self._watch_thread = threading.Thread(
            target=self._watch, name="kongtask-scheduler-watch", daemon=True
        )
        self._watch_thread.start()

    def ready(self) -> None:
        """Nothing to say: the cron service logs its items as it starts."""

    def announce(self, cause: ControlMessage) -> None:
        """A Scheduler on its own says which signal stops it."""
        if self._announce_signals and isinstance(cause, OsSignal):
            self.log.info(
                "Received %s; stopping the cron scheduler", signal.Signals(cause.signum).name
            )

    def shutdown(self, cause: ControlMessage) -> None:
        """Stop the watcher and the cron actors."""
        self.close()

    def close(self) -> None:
        """Stop the watcher (closing its LISTEN connection) and the actors; never raises."""
        self._stopped.set()
        conn = self._listen_conn
        if conn is not None:
            try:
                conn.close()  # interrupts a notifies() wait
            except Exception:  # pragma: no cover - closing is best effort
                pass
        thread = self._watch_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(10.0)
        actors, self.actors = self.actors, None
        if actors is not None:
            actors.stop()

    def reload(self) -> bool:
        """SIGHUP: ask the loader to re-read the crontab, without waiting."""
        self.log.info("SIGHUP received; reloading the crontab")
        self.request_reload()
        return True

    def parts(self) -> list[Part]:
        """Each cron actor, and the watcher thread."""
        actors = self.actors
        if actors is None:
            return []
        parts: list[Part] = [ActorPart(name, ref) for name, ref in actors.parts().items()]
        thread = self._watch_thread
        if thread is not None:
            parts.append(ThreadsPart("cron:watcher", lambda: [("watch", thread)]))
        return parts

    # --- what the Scheduler asks ------------------------------------------------------

    @property
    def running(self) -> bool:
        """True between a successful start and the stop."""
        return self.actors is not None and not self._stopped.is_set()

    def running_actors(self) -> CronService:
        """The cron actors; raises unless running."""
        actors = self.actors
        if actors is None or self._stopped.is_set():
            raise KongtaskError("the Scheduler is not running; start it first")
        return actors

    def request_reload(self) -> None:
        """Ask for a crontab reload without waiting (safe from any thread)."""
        actors = self.actors
        if actors is not None:
            actors.request_reload()

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A connection from the host's pool."""
        host = self._host
        if host is None or host.pool is None:
            raise KongtaskError("the Scheduler is not running; start it first")
        with host.pool.connection() as conn:
            yield conn

    def read_stored(self) -> list[StoredCronItem]:
        """The stored items as in the database now."""
        with self.connection() as conn:
            return list_stored_items(conn, self.queries)

    def refresh_stored_items(self) -> bool:
        """Read the stored items now and apply any change."""
        if not self.use_stored:
            return True
        actors = self.running_actors()
        return actors.set_stored_items([s.item for s in self.read_stored()])

    def lag_s(self) -> float | None:
        """Seconds since the minute cron must handle next (see ``Scheduler.lag_s``)."""
        actors, host = self.actors, self._host
        if actors is None or host is None:
            return None
        return actors.progress.lag_s(host.clock.now())

    def wait_caught_up(self, timeout_s: float) -> bool:
        """Wait until every minute up to the clock's time has been scheduled."""
        actors, host = self.actors, self._host
        if actors is None or host is None:
            return False
        return actors.progress.wait_caught_up(host.clock.now, timeout_s)

    # --- the watcher: stored items, clock skew, retention ---------------------------

    def _watch(self) -> None:
        last_prune: float | None = None
        while not self._stopped.is_set():
            notified = self._wait_for_notice()
            if self._stopped.is_set():
                return
            try:
                if self.use_stored:
                    self.refresh_stored_items()
                if not notified:
                    self._measure_skew()
                    monotonic = self._host.clock.monotonic() if self._host else 0.0
                    if last_prune is None or monotonic - last_prune >= _PRUNE_EVERY_S:
                        last_prune = monotonic
                        self._prune()
            except Exception as exc:  # never let the watcher die: the next round retries
                if not self._stopped.is_set():
                    self.log.warning("Cron scheduler check failed: %s", exc)

    def _wait_for_notice(self) -> bool:
        """Wait up to the check interval for a stored-items NOTIFY; True if one came."""
        interval = self.check_interval_s
        host = self._host
        if not self.use_stored or host is None or host.conninfo is None:
            self._stopped.wait(interval)
            return False
        try:
            if self._listen_conn is None or self._listen_conn.closed:
                # Guarded like every connection: connect timeout, keepalives, and
                # a deadline on each wait, long enough for one quiet interval.
                conn = connect(host.conninfo, DEFAULT_CONNECTION_SETTINGS)
                if conn.deadline_s is not None:
                    conn.deadline_s = max(conn.deadline_s, interval + _DEADLINE_MARGIN_S)
                conn.execute(self.queries.listen_cron_items)
                self._listen_conn = conn
                if self._stopped.is_set():
                    # Stopping began while this connected; the close closed the
                    # previous connection, not this one.
                    conn.close()
                    return False
            for notice in self._listen_conn.notifies(timeout=interval, stop_after=1):
                return notice.payload == self.schema
            return False
        except psycopg.Error as exc:
            if not self._stopped.is_set():
                self.log.warning(
                    "Cannot LISTEN for cron item changes (%s); checking every %ss", exc, interval
                )
                self._listen_conn = None
                self._stopped.wait(interval)
            return False

    def _measure_skew(self) -> None:
        host = self._host
        if host is None or host.pool is None:
            return
        clock = host.clock
        with self.connection() as conn:
            before = clock.now()
            row = conn.execute(self.queries.database_clock).fetchone()
            after = clock.now()
        assert row is not None
        local = before + (after - before) / 2
        skew = (local - row[0]).total_seconds()
        self.clock_skew_s = skew
        over = abs(skew) > self.clock_skew_tolerance_s
        if over and not self._skewed:
            self.log.warning(
                "This node's clock is %.1fs %s the database's (tolerance %.1fs): cron minutes"
                " will be scheduled early or late here; fix the clock (NTP)",
                abs(skew),
                "ahead of" if skew > 0 else "behind",
                self.clock_skew_tolerance_s,
            )
            host.bus.emit(
                events.cron_clock_skew, skew_s=skew, tolerance_s=self.clock_skew_tolerance_s
            )
        self._skewed = over

    def _prune(self) -> None:
        with self.connection() as conn:
            row = conn.execute(self.queries.ping).fetchone()
            assert row is not None
            removed = prune_history(conn, self.queries, row[0] - self.history_retention)
        if removed:
            self.log.info(
                "Pruned %d cron history row(s) older than %s", removed, self.history_retention
            )
