"""The supervisor: starts a Runner's actors in order and stops exactly those.

Everything that can end a run arrives on one control queue: ``stop()``,
``kill()``, OS signals, "run once is done", a breaking migration, or a fatal
error from an actor. One daemon thread reads it and runs the shutdown:
stop claiming and give back buffered jobs, let running jobs finish until the
abort timeout, then set their abort events and fail them back so they retry,
flush the outcomes, and release the pool. A second stop signal (or
``kill()``) cuts the wait short.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from typing import Any

import pykka
from psycopg import errors as pg_errors
from psycopg_pool import ConnectionPool

from kongtask import events
from kongtask.cron.service.outcomes import OutcomeRecorder
from kongtask.cron.source import CrontabSource
from kongtask.cron.types import ParsedCronItem
from kongtask.db.connecting import (
    connect,
    guarded_conninfo,
    open_pool,
)
from kongtask.db.conninfo import open_database
from kongtask.db.migrate import migrate
from kongtask.db.statements import Queries
from kongtask.errors import KongtaskError
from kongtask.job import Job
from kongtask.jobs.claimer import (
    BufferLow,
    Claimer,
    Confirm,
    HeldCount,
    InsertNotified,
    JoinRequest,
    Shutdown,
    Wake,
)
from kongtask.jobs.completer import FLUSH, Completer
from kongtask.jobs.context import WorkerContext, new_pool_id
from kongtask.jobs.executor import ExecutorPool
from kongtask.jobs.listener import Listener
from kongtask.jobs.liveness import Deregister, Liveness, Register
from kongtask.jobs.local_queue import LocalQueue
from kongtask.jobs.outbox import Outbox
from kongtask.jobs.quarantine import CrashGuard
from kongtask.jobs.sweeper import StopTimers, Sweeper
from kongtask.protocols import Clock
from kongtask.runtime.clock import SystemClock
from kongtask.runtime.os_signals import SignalHandlers, can_install
from kongtask.runtime.publisher import EventBus
from kongtask.scheduler import Scheduler
from kongtask.settings import WorkerSettings

__all__ = ["Supervisor"]

logger = logging.getLogger(__name__)

_POOL_OPEN_TIMEOUT_S = 30.0
#: After the abort timeout, what is left of a shutdown (give back buffered jobs,
#: flush outcomes, remove the liveness record, stop the actors) gets this long
#: in all; an actor stuck on a silent connection costs at most its share.
SHUTDOWN_GRACE_S = 5.0
#: No single step of that may take longer than this.
_STEP_TIMEOUT_S = 2.0
# What prepared statements do behind pgbouncer in transaction pooling.
_PREPARED_STATEMENT_ERRORS = (
    pg_errors.DuplicatePreparedStatement,
    pg_errors.InvalidSqlStatementName,
)
GRACEFUL_MESSAGE = "Worker pool is shutting down gracefully"
FORCEFUL_MESSAGE = "Forced worker shutdown"


class Supervisor:
    """Owns one run: its resources, actors, threads and the shutdown sequence."""

    def __init__(
        self,
        *,
        sender: Any,
        settings: WorkerSettings,
        tasks: Mapping[str, Callable[..., Any]],
        connection_string: str | None,
        clock: Clock | None,
        crontab: CrontabSource | None,
        cron_items: list[ParsedCronItem] | None = None,
        no_log_success: bool,
        listen_connection_string: str | None = None,
    ) -> None:
        self.settings = settings
        self.pool_id = new_pool_id(settings.once)
        self._sender = sender
        self._tasks = dict(tasks)
        self._connection_string = connection_string
        self._listen_connection_string = listen_connection_string
        self._guard = CrashGuard()
        self._tasks = {name: self._guard.wrap(handler) for name, handler in self._tasks.items()}
        self._liveness: pykka.ActorRef[Liveness] | None = None
        self._shutdown_deadline: float | None = None
        self._own_clock = clock is None
        self._clock: Clock = (
            clock if clock is not None else SystemClock(name=f"kongtask-clock-{self.pool_id}")
        )
        self._crontab = crontab
        self._cron_items = cron_items
        self.cron: Scheduler | None = None
        self._no_log_success = no_log_success
        self._control: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._stack = ExitStack()
        self._signals: SignalHandlers | None = None
        self._thread: threading.Thread | None = None
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.ctx: WorkerContext | None = None
        self.bus = EventBus(sender)
        self._claimer: pykka.ActorRef[Claimer] | None = None
        self._completer: pykka.ActorRef[Completer] | None = None
        self._sweeper: pykka.ActorRef[Sweeper] | None = None
        self._executors: ExecutorPool | None = None
        self._listener: Listener | None = None
        self._shutting_down = False

    # --- starting -------------------------------------------------------------------

    def start(self, install_signals: bool) -> None:
        """Connect, migrate and start every actor; raises (having cleaned up) on failure."""
        try:
            self._start(install_signals)
        except BaseException:
            self._teardown()
            raise

    def _start(self, install_signals: bool) -> None:
        settings = self.settings
        options = settings.connection
        conninfo = self._stack.enter_context(open_database(self._connection_string))
        with connect(conninfo, options) as conn:
            migrate(conn, settings.schema)
        # Every session of this run announces the pool id as its application_name
        # (for the operator's eye; liveness itself is the _kongtask_pools record).
        conninfo = guarded_conninfo(conninfo, options, application_name=self.pool_id)
        pool = self._open_pool(conninfo)
        self.bus.start()
        self._stack.callback(self.bus.stop)

        def buffer_low() -> None:
            if self._claimer is not None:
                self._claimer.tell(BufferLow())

        local_queue = LocalQueue(settings.batch_size, buffer_low)
        ctx = self.ctx = WorkerContext(
            settings=settings,
            queries=Queries(settings.schema),
            pool_id=self.pool_id,
            conninfo=conninfo,
            pool=pool,
            tasks=self._tasks,
            clock=self._clock,
            bus=self.bus,
            queue=local_queue,
            fatal=self._fatal,
            request_shutdown=lambda message: self._control.put(("shutdown", message)),
            no_log_success=self._no_log_success,
        )
        self._guard.ctx = ctx
        if (
            settings.local_queue_size is not None
            and settings.local_queue_size < settings.concurrency
        ):
            logger.warning(
                "local_queue_size (%d) is smaller than concurrency (%d): some executors "
                "will always be idle",
                settings.local_queue_size,
                settings.concurrency,
            )
        self.bus.emit(events.pool_create, pool_id=self.pool_id)
        # The liveness record exists before anything is claimed, so a pool id
        # seen in locked_by without a live record always means a dead pool.
        self._liveness = Liveness.start(ctx, self._nudge)
        if self._liveness.ask(Register(), timeout=_POOL_OPEN_TIMEOUT_S) is not True:
            raise KongtaskError(f"pool {self.pool_id} could not register its liveness record")
        outbox = Outbox(wake=self._flush_outcomes)
        self._claimer = Claimer.start(ctx, outbox)
        self._completer = Completer.start(ctx, outbox, self._claimer)
        self._outbox = outbox
        if not settings.once:
            self._start_listener(ctx, conninfo)
        # Outcomes of cron jobs this pool runs go into kongtask's cron history
        # (the executors report them directly, for cron jobs only).
        outcomes = OutcomeRecorder(connect=pool.connection, queries=ctx.queries)
        outcomes.start()
        self._stack.callback(outcomes.stop)
        ctx.cron_outcomes = outcomes
        self._executors = ExecutorPool(
            ctx, outbox, on_all_stopped=self._workers_stopped, confirm=self._confirm
        )
        self._executors.start()
        if not settings.once:
            self._sweeper = Sweeper.start(ctx, self._nudge)
        self._thread = threading.Thread(
            target=self._supervise, name=f"kongtask-supervisor-{self.pool_id}", daemon=True
        )
        self._thread.start()
        if install_signals and can_install():
            self._signals = SignalHandlers(self._control)
            self._signals.install()
        if self._crontab is not None:
            # The Runner's cron part is a kongtask.Scheduler on this pool and bus.
            self.cron = Scheduler._embed(
                pool=pool,
                schema=settings.schema,
                source=self._crontab,
                items=self._cron_items,
                clock=self._clock,
                emit=self.bus.emit,
                node_name=self.pool_id,
            )
            self.cron.start()
        self._nudge()
        logger.info(
            "Worker connected and looking for jobs... (pool %s, task names: %s)",
            self.pool_id,
            ", ".join(f"'{name}'" for name in self._tasks) or "none",
        )
        self.bus.flush()

    def _open_pool(self, conninfo: str) -> ConnectionPool[Any]:
        """The run's connection pool: deadlines on every statement, a check on every checkout."""
        settings = self.settings
        pool = open_pool(
            conninfo,
            settings.connection,
            name=self.pool_id,
            min_size=2,
            max_size=settings.max_pool_size,
            deadline_s=settings.statement_timeout_s,
            prepared_statements=settings.prepared_statements,
            open_timeout_s=_POOL_OPEN_TIMEOUT_S,
        )
        self._stack.callback(lambda: pool.close(timeout=self._step_timeout()))
        return pool

    def _start_listener(self, ctx: WorkerContext, conninfo: str) -> None:
        """LISTEN on the listen connection if given, else the main one (not through pgbouncer)."""
        settings = self.settings
        listen = self._listen_connection_string
        if listen is not None:
            conninfo = guarded_conninfo(listen, settings.connection, application_name=self.pool_id)
        elif settings.pgbouncer:
            logger.warning(
                "pgbouncer=True and no listen_connection_string: LISTEN cannot work through "
                "transaction pooling, so this worker is polling for new jobs every %g ms. Set "
                "listen_connection_string (--listen-connection) to a direct PostgreSQL "
                "connection for instant wake-ups.",
                settings.poll_interval_s * 1000,
            )
            return
        self._listener = Listener(ctx, self._insert_notified, conninfo=conninfo)
        self._listener.start()

    def _nudge(self) -> None:
        if self._claimer is not None:
            self._claimer.tell(Wake())

    def _flush_outcomes(self) -> None:
        # The outbox went from empty to busy (the claimer can fill it only
        # once the completer exists: it claims after the first nudge).
        if self._completer is not None:
            self._completer.tell(FLUSH)

    def _insert_notified(self) -> None:
        if self._claimer is not None:
            self._claimer.tell(InsertNotified())

    def _confirm(self, job: Job, reason: str) -> bool:
        """Whether this pool still holds ``job`` (an executor asks; the claimer checks).

        No timeout: the claimer answers within its statement deadline and
        retries, and a stopped claimer answers with ActorDeadError. Without
        an answer the job runs, as it would have before the check existed.
        """
        claimer = self._claimer
        if claimer is None:
            return True
        try:
            return bool(claimer.ask(Confirm(job, reason)))
        except pykka.ActorDeadError:
            logger.warning(
                "Could not check whether pool %s still holds job %s (the pool is stopping); "
                "running it",
                self.pool_id,
                job.id,
            )
            return True

    # --- control --------------------------------------------------------------------

    def stop(self) -> None:
        """Begin a graceful shutdown (emits ``stop``)."""
        self._control.put(("stop", None))

    def kill(self) -> None:
        """Begin (or escalate to) a forceful shutdown."""
        self._control.put(("kill", FORCEFUL_MESSAGE))

    def join(self, timeout_s: float) -> None:
        """Wait until cron has scheduled every minute up to the clock's time, then until
        nothing runnable is claimed, running or unrecorded."""
        claimer = self._claimer
        if claimer is None or self.done.is_set():
            return
        deadline = self._clock_monotonic() + timeout_s
        cron = self.cron
        if cron is not None and not cron.wait_caught_up(timeout_s):
            raise TimeoutError(f"cron had not caught up with its clock after {timeout_s}s")
        timeout_s = max(0.0, deadline - self._clock_monotonic())
        idle = threading.Event()
        claimer.tell(JoinRequest(idle))
        if not idle.wait(timeout_s):
            held = self._ask(claimer, HeldCount())
            raise TimeoutError(f"the worker still had {held} job(s) in hand after {timeout_s}s")

    def restore_signals(self) -> None:
        """Put the host's signal handlers back (only possible from the main thread)."""
        if self._signals is not None:
            self._signals.remove()

    def _fatal(self, action: str, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.bus.emit(events.pool_fatal_error, pool_id=self.pool_id, error=exc, action=action)
        message = f"{action} failed: {exc}"
        if isinstance(exc, _PREPARED_STATEMENT_ERRORS) and not self.settings.pgbouncer:
            message += (
                " (prepared statements are lost or doubled: is the connection going through "
                "pgbouncer in transaction pooling? Then run with pgbouncer=True / --pgbouncer)"
            )
        self._control.put(("fatal", message))

    def _workers_stopped(self) -> None:
        self._control.put(("workers_stopped", None))

    def _supervise(self) -> None:
        try:
            self._control_loop()
        except BaseException as exc:
            # A bug here must not leave the actors running unsupervised.
            logger.exception("The supervisor of worker pool %s failed", self.pool_id)
            if self.error is None:
                self.error = exc
            if not self.done.is_set():
                self._teardown()

    def _control_loop(self) -> None:
        signals_seen = 0
        while True:
            kind, value = self._control.get()
            if kind == "signal":
                if value == signal.SIGHUP:
                    self._reload()
                    continue
                signals_seen += 1
                name = signal.Signals(value).name
                self.bus.emit(events.graceful_shutdown, signal=name)
                logger.info("Received %s; shutting down gracefully (send again to force)", name)
                self._shutdown(f"{GRACEFUL_MESSAGE} ({name})", forceful=False)
                return
            if kind == "stop":
                self.bus.emit(events.stop)
                self._shutdown(GRACEFUL_MESSAGE, forceful=False)
                return
            if kind == "kill":
                self.bus.emit(events.stop)
                self._shutdown(value, forceful=True)
                return
            if kind in ("shutdown", "fatal"):
                if kind == "fatal":
                    logger.error("Shutting down worker pool %s: %s", self.pool_id, value)
                else:
                    logger.info("%s", value)
                self._shutdown(value, forceful=False)
                return

    def _reload(self) -> None:
        if self.cron is None:
            logger.info("SIGHUP received; no crontab to reload")
            return
        logger.info("SIGHUP received; reloading the crontab")
        self.cron.request_reload()

    # --- stopping -------------------------------------------------------------------

    def _shutdown(self, message: str, *, forceful: bool) -> None:
        ctx = self.ctx
        assert ctx is not None and self._executors is not None
        ctx.stopping = True
        signal_name = events.pool_forceful_shutdown if forceful else events.pool_graceful_shutdown
        self.bus.emit(signal_name, pool_id=self.pool_id, message=message)
        force_failed: list[Any] = []
        self._stop_cron()
        try:
            if forceful:
                ctx.give_up.set()
            if self._listener is not None:
                self._listener.stop(_STEP_TIMEOUT_S)
            if self._sweeper is not None:
                self._sweeper.tell(StopTimers())
            self._ask(self._claimer, Shutdown())
            self._executors.release()
            forceful = self._wait_for_workers(forceful)
            if not forceful:
                self._executors.signal_abort()
            self._shutdown_deadline = self._clock_monotonic() + SHUTDOWN_GRACE_S
            force_failed = self._executors.abandon_running()
            fail_message = FORCEFUL_MESSAGE if forceful else message
            for job in force_failed:
                self._outbox.failure(job, fail_message)
            if force_failed:
                logger.warning(
                    "Failed %d job(s) that were still running at shutdown: %s",
                    len(force_failed),
                    ", ".join(str(job.id) for job in force_failed),
                )
            self._ask(self._completer, FLUSH)
            self._ask(self._liveness, Deregister())
            for worker_id in self._executors.still_running_ids():
                self.bus.emit(events.worker_stop, worker_id=worker_id, error=None)
        except Exception as exc:
            logger.exception("Shutting down worker pool %s failed", self.pool_id)
            error_signal = (
                events.pool_forceful_shutdown_error
                if forceful
                else events.pool_graceful_shutdown_error
            )
            self.bus.emit(error_signal, pool_id=self.pool_id, error=exc)
            if self.error is None:
                self.error = exc
        else:
            if forceful:
                self.bus.emit(
                    events.pool_forceful_shutdown_complete,
                    pool_id=self.pool_id,
                    force_failed_jobs=force_failed,
                )
            else:
                self.bus.emit(events.pool_graceful_shutdown_complete, pool_id=self.pool_id)
        finally:
            self._teardown()

    def _wait_for_workers(self, forceful: bool) -> bool:
        """Wait for the workers until the abort timeout; True if the wait was forced short."""
        assert self._executors is not None
        if forceful:
            return True
        deadline = self._clock_monotonic() + self.settings.graceful_shutdown_abort_timeout_s
        while not self._executors.all_stopped():
            remaining = deadline - self._clock_monotonic()
            if remaining <= 0:
                return False
            try:
                kind, value = self._control.get(timeout=remaining)
            except queue.Empty:
                return False
            if kind == "kill" or (kind == "signal" and value != signal.SIGHUP):
                if kind == "signal":
                    self.bus.emit(events.forceful_shutdown, signal=signal.Signals(value).name)
                if self.ctx is not None:
                    self.ctx.give_up.set()
                return True
            if kind == "signal":
                self._reload()
        return False

    @staticmethod
    def _clock_monotonic() -> float:
        # The abort timeout is real time even with a manual clock: a test's
        # handlers run on real threads.
        import time

        return time.monotonic()

    def _step_timeout(self) -> float:
        """How long the next shutdown step may take: its share of what is left of the grace."""
        deadline = self._shutdown_deadline
        if deadline is None:
            return _STEP_TIMEOUT_S
        return max(0.1, min(_STEP_TIMEOUT_S, deadline - self._clock_monotonic()))

    def _ask(self, ref: pykka.ActorRef[Any] | None, message: object) -> Any:
        if ref is None:
            return None
        timeout = self._step_timeout()
        try:
            return ref.ask(message, timeout=timeout)
        except pykka.ActorDeadError:
            return None
        except pykka.Timeout:
            # Stuck (a statement on a silent connection): leave it behind.
            logger.warning(
                "Shutdown of pool %s: %r got no answer within %.1f s; going on without it",
                self.pool_id,
                message,
                timeout,
            )
            return None

    def _stop_cron(self) -> None:
        cron, self.cron = self.cron, None
        if cron is not None:
            cron.stop()

    def _teardown(self) -> None:
        """Stop exactly what this run started, in reverse order; never raises."""
        self._stop_cron()
        if self.ctx is not None:
            self.ctx.stopping = True
            self.ctx.queue.close()
        for ref in (self._sweeper, self._claimer, self._completer, self._liveness):
            if ref is not None:
                try:
                    ref.stop(timeout=self._step_timeout())
                except (pykka.ActorDeadError, pykka.Timeout):
                    pass
        if self._listener is not None:
            self._listener.stop(self._step_timeout())
        if self.ctx is not None:
            self.bus.emit(events.pool_release, pool_id=self.pool_id)
        try:
            self._stack.close()
        except Exception:
            logger.exception("Releasing the resources of worker pool %s failed", self.pool_id)
        if self._own_clock:
            close = getattr(self._clock, "close", None)
            if close is not None:
                close()
        self.restore_signals()
        self.done.set()

    def check(self) -> None:
        """Raise the fatal error that ended the run, if there was one."""
        if self.error is not None:
            raise KongtaskError(f"worker pool {self.pool_id} failed: {self.error}") from self.error
