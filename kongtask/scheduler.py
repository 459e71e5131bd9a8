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
import socket
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from psycopg_pool import ConnectionPool

from kongtask.cron.parser import parse_cron_item
from kongtask.cron.service.scheduling import SchedulingService
from kongtask.cron.service.store import (
    CronRun,
    ItemLike,
    StoredCronItem,
    add_stored_item,
    cron_history,
    remove_stored_item,
    to_parsed_item,
    update_stored_item,
)
from kongtask.cron.source import CrontabSource, check_unique_identifiers
from kongtask.cron.types import CronItem, ParsedCronItem
from kongtask.db.connecting import DEFAULT_CONNECTION_SETTINGS
from kongtask.db.conninfo import resolve_schema
from kongtask.errors import ConfigurationError, KongtaskError
from kongtask.protocols import Clock
from kongtask.runtime.control import Stop
from kongtask.runtime.host import Host
from kongtask.runtime.parts import Part
from kongtask.validate import check_clock, check_connection_string, check_seconds

__all__ = ["Scheduler"]

_LOGGER = logging.getLogger("kongtask.cron")


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
        check_connection_string(connection_string)
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
        source = CrontabSource.of(crontab=crontab, crontab_file=crontab_file)
        service = SchedulingService(
            schema=resolve_schema(schema),
            source=source,
            items=None,
            code_items=_parse_code_items(cron_items),
            backfill_on_start=backfill_on_start,
            clock_skew_tolerance_s=float(clock_skew_tolerance_s),
            stored_items=stored_items,
            check_interval_s=float(stored_items_check_interval_s),
            history_retention=history_retention,
            node_name=node_name or f"{socket.gethostname()}/{os.getpid()}/{id(self):x}",
            log=logger or _LOGGER,
            announce_signals=True,
        )
        self._init(
            service,
            host=None,
            owns_host=True,
            connection_string=connection_string,
            pool=pool,
            clock=clock,
            install_signals=install_signal_handlers,
        )

    def _init(
        self,
        service: SchedulingService,
        *,
        host: Host | None,
        owns_host: bool,
        connection_string: str | None = None,
        pool: ConnectionPool[Any] | None = None,
        clock: Clock | None = None,
        install_signals: bool | None = False,
    ) -> None:
        """The state every Scheduler has: its cron service, its host once running, and
        (on its own) where to connect, its clock and whether it handles signals."""
        self._service = service
        self._host = host
        self._owns_host = owns_host
        self._connection_string = connection_string
        self._host_pool = pool
        self._given_clock = clock
        self._install_signals = install_signals

    @classmethod
    def _view(cls, host: Host, service: SchedulingService) -> Scheduler:
        """The Scheduler of a Runner: a view on the Runner's host and its cron service."""
        scheduler = cls.__new__(cls)
        scheduler._init(service, host=host, owns_host=False)
        return scheduler

    # --- configuration --------------------------------------------------------------

    @property
    def schema(self) -> str:
        """The schema whose cron this Scheduler runs."""
        return self._service.schema

    @property
    def backfill_on_start(self) -> bool:
        """Whether this node backfills missed minutes when it starts."""
        return self._service.backfill_on_start

    @property
    def clock_skew_tolerance_s(self) -> float:
        """How far this node's clock may differ from the database's before a warning."""
        return self._service.clock_skew_tolerance_s

    @property
    def history_retention(self) -> timedelta:
        """How long the cron history is kept."""
        return self._service.history_retention

    @property
    def node_name(self) -> str:
        """This node's name in the cron history."""
        return self._service.node_name

    @property
    def clock_skew_s(self) -> float | None:
        """The last measured difference between the database's clock and this node's
        (positive: this node is ahead), or None before the first measurement."""
        return self._service.clock_skew_s

    # --- lifecycle ----------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True between a successful start and the end of stop()."""
        host = self._host
        return host is not None and not host.status.stopped and self._service.running

    def start(self) -> Self:
        """Parse the crontab, connect, migrate, start scheduling; returns at once.

        A bad crontab raises ``CrontabError`` before anything connects.
        """
        if self._host is not None:
            raise KongtaskError("this Scheduler was already started; make a new one")
        service = self._service
        # Parsed before connecting: a bad line fails with nothing touched.
        service.preload()
        host = self._host = Host(
            sender=self,
            name=f"kongtask-scheduler-{self.schema}"[:63],
            clock=self._given_clock,
            clock_name="kongtask-scheduler-clock",
        )
        try:
            if self._host_pool is not None:
                host.use_pool(self._host_pool, schema=self.schema)
            else:
                host.open_database(
                    self._connection_string,
                    schema=self.schema,
                    settings=DEFAULT_CONNECTION_SETTINGS,
                    pool_name=host.name,
                    min_size=1,
                    max_size=3,
                )
        except BaseException:
            host.close()
            raise
        host.start([service], install_signals=self._install_signals is not False)
        return self

    def stop(self, timeout: float | None = None) -> bool:
        """Stop scheduling and release what this Scheduler opened; True once stopped.

        A host's own pool is never closed. On a Runner's Scheduler this stops
        its cron alone.
        """
        host = self._host
        if host is None:
            return True
        if not self._owns_host:
            self._service.close()
            return True
        host.send(Stop())
        stopped = host.status.wait_stopped(timeout)
        if stopped:
            host.restore_signals()
        return stopped

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the Scheduler has stopped (a signal or stop()); False on timeout."""
        host = self._host
        if host is None:
            return False
        if not self._owns_host:
            return self._service.wait_stopped(timeout)
        return host.status.wait_stopped(timeout)

    def __enter__(self) -> Self:
        if self._host is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def parts(self) -> list[Part]:
        """The cron actors and the watcher, as parts; empty unless running."""
        return self._service.parts()

    # --- the live items ---------------------------------------------------------

    def get_cron_items(self) -> list[ParsedCronItem]:
        """The items being scheduled now (crontab, code and stored items)."""
        return self._service.running_actors().items()

    def reload_cron_items(self, items: Sequence[ItemLike] | None = None) -> bool:
        """``None``: re-read the crontab file (or text) given; a list: replace the code items.

        True if the change took effect; False (the previous schedule kept, the error
        logged and ``cron:reloadFailed`` emitted) if it did not.
        """
        actors = self._service.running_actors()
        if items is None:
            return actors.reload()
        return actors.set_code_items(_parse_code_items(items))

    def reload(self, timeout_s: float | None = 30.0) -> bool:
        """Re-read the crontab (what SIGHUP does); see :meth:`reload_cron_items`."""
        return self._service.running_actors().reload(timeout_s)

    def request_reload(self) -> None:
        """Ask for a crontab reload without waiting (safe from any thread)."""
        self._service.request_reload()

    # --- stored items (fleet-wide) ------------------------------------------------

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
        with self._service.connection() as conn:
            stored = add_stored_item(conn, self._service.queries, parsed)
        self.refresh_stored_items()
        return stored

    def update_cron_item(self, item: ItemLike) -> StoredCronItem:
        """Replace a stored item (same identifier) on every node."""
        with self._service.connection() as conn:
            stored = update_stored_item(conn, self._service.queries, item)
        self.refresh_stored_items()
        return stored

    def remove_cron_item(self, identifier: str) -> bool:
        """Remove a stored item from every node; False if there was none."""
        with self._service.connection() as conn:
            removed = remove_stored_item(conn, self._service.queries, identifier)
        self.refresh_stored_items()
        return removed

    def list_cron_items(self) -> list[StoredCronItem]:
        """The stored items (not the crontab or code items: see :meth:`get_cron_items`)."""
        return self._service.read_stored()

    def refresh_stored_items(self) -> bool:
        """Read the stored items now and apply any change (the watcher does this too)."""
        return self._service.refresh_stored_items()

    def lag_s(self) -> float | None:
        """How far this node's cron is behind: seconds since the minute it must handle next.

        0 while it keeps up (the next minute is still ahead); ``None`` before
        the minute loop runs (while registering and backfilling) or when stopped.
        Read by the ``/readyz`` probe.
        """
        return self._service.lag_s()

    def wait_caught_up(self, timeout_s: float = 30.0) -> bool:
        """Wait until every minute up to this node's clock has been scheduled (the jobs
        of passed minutes exist); False on timeout or when not running."""
        return self._service.wait_caught_up(timeout_s)

    # --- history --------------------------------------------------------------------

    def history(
        self,
        identifier: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
    ) -> list[CronRun]:
        """Recorded firings, newest first: when each ran, on which node, and how it went."""
        with self._service.connection() as conn:
            return cron_history(
                conn,
                self._service.queries,
                identifier=identifier,
                since=since,
                until=until,
                limit=limit,
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
