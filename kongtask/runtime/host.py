"""The Host: what one run has once, and the services it runs.

A process run has one database (the embedded server when no connection
string resolves), one deadline-guarded connection pool, one event bus, one
clock, optionally the OS signal handlers, one **run state** and one **control
loop**. A Runner is a host running a ``JobService`` (and a cron service when
it has a crontab); a Scheduler is a host running a cron service. Services
are started in order; when the run ends every service is told why (in start
order: events, logs), then shut down newest first, and the host releases
what it opened.

The run state (:class:`RunStatus`) belongs to the host alone: parts read it
(is the run ending? aborting?) but never write it. Everything that ends or
reloads a run is a typed message (:mod:`kongtask.runtime.control`) read by
one daemon thread.
"""

from __future__ import annotations

import enum
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any, Protocol

from psycopg_pool import ConnectionPool

from kongtask import events
from kongtask.db.connecting import connect, guarded_conninfo, open_pool
from kongtask.db.conninfo import open_database
from kongtask.db.migrate import migrate
from kongtask.protocols import Clock
from kongtask.runtime.clock import SystemClock
from kongtask.runtime.control import (
    ControlMessage,
    Fatal,
    Kill,
    OsSignal,
    Reload,
    ShutdownRequested,
    Stop,
    WorkersStopped,
)
from kongtask.runtime.os_signals import SignalHandlers, can_install
from kongtask.runtime.parts import Part
from kongtask.runtime.publisher import EventBus
from kongtask.settings import ConnectionSettings

__all__ = ["Host", "RunState", "RunStatus", "Service"]

logger = logging.getLogger(__name__)

_POOL_OPEN_TIMEOUT_S = 30.0
#: No single step of a shutdown may take longer than this.
STEP_TIMEOUT_S = 2.0


class RunState(enum.Enum):
    """Where a run is: it only ever moves forward."""

    RUNNING = 1
    DRAINING = 2
    ABORTING = 3
    STOPPED = 4


class RunStatus:
    """The run state, owned by the host; everyone else only reads it or waits on it."""

    def __init__(self) -> None:
        self._state = RunState.RUNNING
        self._lock = threading.Lock()
        self._ending = threading.Event()
        #: Set once the run aborts: database retries stop waiting and give up.
        self.aborting = threading.Event()
        self._stopped = threading.Event()

    @property
    def state(self) -> RunState:
        """The state now."""
        return self._state

    @property
    def ending(self) -> bool:
        """True once the run has begun to end (draining, aborting or stopped)."""
        return self._ending.is_set()

    @property
    def stopped(self) -> bool:
        """True once the host has released everything."""
        return self._stopped.is_set()

    def wait_stopped(self, timeout_s: float | None = None) -> bool:
        """Block until the run has stopped; False on timeout."""
        return self._stopped.wait(timeout_s)

    def advance(self, state: RunState) -> None:
        """Move forward to ``state`` (the host's call alone; moving back is ignored)."""
        with self._lock:
            if state.value <= self._state.value:
                return
            self._state = state
        self._ending.set()
        if state.value >= RunState.ABORTING.value:
            self.aborting.set()
        if state is RunState.STOPPED:
            self._stopped.set()


class Service(Protocol):
    """Something a host runs: started on it, told why the run ends, shut down, reloaded."""

    name: str

    def start(self, host: Host) -> None:
        """Start on ``host`` (its pool, bus and clock are ready); raise to fail the start."""

    def ready(self) -> None:
        """Every service has started and the signal handlers are in place: say so (logs)."""

    def announce(self, cause: ControlMessage) -> None:
        """Say why the run ends (events, logs); every service hears it before any stops."""

    def shutdown(self, cause: ControlMessage) -> None:
        """Wind down on the control thread (the run is draining); never raises."""

    def close(self) -> None:
        """Release whatever is still held, also after a failed start; never raises."""

    def reload(self) -> bool:
        """Reload (SIGHUP); False when this service has nothing to reload."""

    def parts(self) -> list[Part]:
        """The service's actors and thread groups."""


class Host:
    """Owns a run's database, pool, bus, clock, signals, run state and control loop."""

    def __init__(
        self,
        *,
        sender: object,
        name: str,
        clock: Clock | None,
        clock_name: str | None = None,
    ) -> None:
        self.name = name
        self.status = RunStatus()
        self.bus = EventBus(sender)
        self._own_clock = clock is None
        self.clock: Clock = (
            clock if clock is not None else SystemClock(name=clock_name or f"kongtask-clock-{name}")
        )
        self.pool: ConnectionPool[Any] | None = None
        self.conninfo: str | None = None
        #: The first fatal error of the run, if any.
        self.error: BaseException | None = None
        self._control: queue.SimpleQueue[ControlMessage] = queue.SimpleQueue()
        self._services: list[Service] = []
        self._stack = ExitStack()
        self._signals: SignalHandlers | None = None
        self._thread: threading.Thread | None = None
        self._grace_deadline: float | None = None

    # --- the database -----------------------------------------------------------------

    def open_database(
        self,
        connection_string: str | None,
        *,
        schema: str,
        settings: ConnectionSettings,
        pool_name: str,
        min_size: int,
        max_size: int,
        prepared_statements: bool = True,
    ) -> ConnectionPool[Any]:
        """Resolve the database (the embedded server if need be), migrate ``schema``, and
        open the run's pool: guarded conninfo, a deadline on every wait, a checked checkout."""
        conninfo = self._stack.enter_context(open_database(connection_string))
        with connect(conninfo, settings) as conn:
            migrate(conn, schema)
        # Every session of this run announces the pool name as its application_name.
        conninfo = guarded_conninfo(conninfo, settings, application_name=pool_name)
        pool = open_pool(
            conninfo,
            settings,
            name=pool_name,
            min_size=min_size,
            max_size=max_size,
            deadline_s=settings.statement_timeout_s,
            prepared_statements=prepared_statements,
            open_timeout_s=_POOL_OPEN_TIMEOUT_S,
        )
        self._stack.callback(lambda: pool.close(timeout=self.step_timeout()))
        self.pool, self.conninfo = pool, conninfo
        return pool

    def use_pool(self, pool: ConnectionPool[Any], *, schema: str | None) -> None:
        """Run on a pool someone else owns (never closed here); migrate ``schema`` if given."""
        if schema is not None:
            with pool.connection() as conn:
                conn.commit()  # migrate() wants no transaction in progress
                migrate(conn, schema)
        conninfo = pool.conninfo
        self.pool, self.conninfo = pool, conninfo() if callable(conninfo) else conninfo

    # --- running ----------------------------------------------------------------------

    def start(self, services: Sequence[Service], *, install_signals: bool) -> None:
        """Start the bus and ``services`` in order, then the control loop and (if asked and
        possible) the signal handlers; on failure release everything and raise."""
        try:
            self.bus.start()
            self._stack.callback(self.bus.stop)
            for service in services:
                self._services.append(service)
                service.start(self)
            self._thread = threading.Thread(
                target=self._supervise, name=f"kongtask-host-{self.name}", daemon=True
            )
            self._thread.start()
            if install_signals and can_install():
                self._signals = SignalHandlers(self._control)
                self._signals.install()
            # Only now is the run up: a "ready" line read by a supervisor (a test, an
            # operator's script) may be followed at once by SIGHUP or SIGTERM.
            for service in services:
                service.ready()
            self.bus.flush()
        except BaseException:
            self._teardown()
            raise

    def send(self, message: ControlMessage) -> None:
        """Put ``message`` on the control queue (safe from any thread, and signal handlers)."""
        self._control.put(message)

    def fail(self, message: str, error: BaseException) -> None:
        """A part failed beyond recovery: remember the first error, end the run loudly."""
        if self.error is None:
            self.error = error
        self._control.put(Fatal(message, error))

    def request_shutdown(self, message: str) -> None:
        """A part asks for a graceful end of the run."""
        self._control.put(ShutdownRequested(message))

    def parts(self) -> list[Part]:
        """Every part of the run: the publisher, then each service's, in start order."""
        if self.status.stopped:
            return []
        parts = self.bus.parts()
        for service in self._services:
            parts.extend(service.parts())
        return parts

    def close(self) -> None:
        """Release what was opened when the start failed before :meth:`start` ran."""
        self._teardown()

    def restore_signals(self) -> None:
        """Put the previous signal handlers back (only possible from the main thread)."""
        if self._signals is not None:
            self._signals.remove()

    # --- the shutdown's time budget ---------------------------------------------------

    def begin_grace(self, grace_s: float) -> None:
        """What is left of the shutdown gets ``grace_s`` in all, from now."""
        self._grace_deadline = time.monotonic() + grace_s

    def step_timeout(self) -> float:
        """How long the next shutdown step may take: its share of what is left of the grace."""
        deadline = self._grace_deadline
        if deadline is None:
            return STEP_TIMEOUT_S
        return max(0.1, min(STEP_TIMEOUT_S, deadline - time.monotonic()))

    def abort(self) -> None:
        """Move the run to ABORTING (waits on the database give up)."""
        self.status.advance(RunState.ABORTING)

    def wait_drained(self, drained: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until ``drained()`` or ``timeout_s``; True if a kill or a second signal cut
        the wait short (the run is then aborting). SIGHUP still reloads meanwhile."""
        # Real time even with a manual clock: a test's handlers run on real threads.
        deadline = time.monotonic() + timeout_s
        while not drained():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                message = self._control.get(timeout=remaining)
            except queue.Empty:
                return False
            match message:
                case OsSignal(signum=signal.SIGHUP) | Reload():
                    self._reload()
                case OsSignal(signum=signum):
                    self.bus.emit(events.forceful_shutdown, signal=signal.Signals(signum).name)
                    self.abort()
                    return True
                case Kill():
                    self.abort()
                    return True
                case _:
                    pass
        return False

    # --- the control loop -------------------------------------------------------------

    def _supervise(self) -> None:
        try:
            self._control_loop()
        except BaseException as exc:
            # A bug here must not leave the parts running unsupervised.
            logger.exception("The control loop of %s failed", self.name)
            if self.error is None:
                self.error = exc
            if not self.status.stopped:
                self._teardown()

    def _control_loop(self) -> None:
        while True:
            message = self._control.get()
            match message:
                case OsSignal(signum=signal.SIGHUP) | Reload():
                    self._reload()
                case WorkersStopped():
                    pass
                case Stop() | Kill() | OsSignal() | Fatal() | ShutdownRequested():
                    self._end(message)
                    return

    def _reload(self) -> None:
        reloaded = [service.reload() for service in self._services]  # every one reloads
        if not any(reloaded):
            logger.info("SIGHUP received; no crontab to reload")

    def _end(self, cause: ControlMessage) -> None:
        self.status.advance(RunState.DRAINING)
        for service in self._services:
            service.announce(cause)
        for service in reversed(self._services):
            service.shutdown(cause)
        self._teardown()

    def _teardown(self) -> None:
        """Release exactly what this run opened, newest first; never raises (and once)."""
        if self.status.stopped:
            return
        self.status.advance(RunState.DRAINING)
        for service in reversed(self._services):
            try:
                service.close()
            except Exception:
                logger.exception("Closing the %s service of %s failed", service.name, self.name)
        try:
            self._stack.close()
        except Exception:
            logger.exception("Releasing the resources of %s failed", self.name)
        if self._own_clock:
            close = getattr(self.clock, "close", None)
            if close is not None:
                close()
        self.restore_signals()
        self.status.advance(RunState.STOPPED)
