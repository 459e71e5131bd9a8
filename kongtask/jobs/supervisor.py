"""The job service: starts a Runner's job actors in order and stops exactly those.

It runs on a :class:`~kongtask.runtime.host.Host`, which owns the pool, the
bus, the clock, the signals, the run state and the control loop. When the run
ends the host tells this service why; the service then stops claiming and
gives back buffered jobs, lets running jobs finish until the abort timeout,
then sets their abort events and fails them back so they retry, flushes the
outcomes and removes the liveness record. A second stop signal (or
``kill()``) cuts the wait short.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Mapping
from typing import Any

import pykka
from psycopg import errors as pg_errors

from kongtask import events
from kongtask.db.connecting import guarded_conninfo
from kongtask.db.statements import Queries
from kongtask.declared import declared
from kongtask.errors import KongtaskError
from kongtask.job import Job
from kongtask.jobs.aio import AsyncJobs, is_async_handler
from kongtask.jobs.cancel import read_notice
from kongtask.jobs.claimer import (
    BufferLow,
    Claimer,
    Confirm,
    HeldCount,
    InsertNotified,
    JoinRequest,
    LimitsChanged,
    Shutdown,
    Wake,
)
from kongtask.jobs.completer import FLUSH, Completer
from kongtask.jobs.context import WorkerContext, new_pool_id
from kongtask.jobs.executor import ExecutorPool
from kongtask.jobs.isolation import starting_in_spawned_child
from kongtask.jobs.listener import Listener
from kongtask.jobs.liveness import Deregister, Liveness, Register
from kongtask.jobs.local_queue import LocalQueue
from kongtask.jobs.outbox import Outbox, OutcomeObserver, OutcomeObserverFactory
from kongtask.jobs.quarantine import CrashGuard
from kongtask.jobs.sweeper import StopTimers, Sweeper
from kongtask.runtime.control import (
    ControlMessage,
    Fatal,
    Kill,
    OsSignal,
    ShutdownRequested,
    Stop,
    WorkersStopped,
)
from kongtask.runtime.host import Host
from kongtask.runtime.parts import ActorPart, Part, ThreadsPart
from kongtask.settings import WorkerSettings

__all__ = ["FORCEFUL_MESSAGE", "GRACEFUL_MESSAGE", "JobService"]

logger = logging.getLogger(__name__)

_POOL_OPEN_TIMEOUT_S = 30.0
#: After the abort timeout, what is left of a shutdown (give back buffered jobs,
#: flush outcomes, remove the liveness record, stop the actors) gets this long
#: in all; an actor stuck on a silent connection costs at most its share.
SHUTDOWN_GRACE_S = 5.0
# What prepared statements do behind pgbouncer in transaction pooling.
_PREPARED_STATEMENT_ERRORS = (
    pg_errors.DuplicatePreparedStatement,
    pg_errors.InvalidSqlStatementName,
)
GRACEFUL_MESSAGE = "Worker pool is shutting down gracefully"
FORCEFUL_MESSAGE = "Forced worker shutdown"


class JobService:
    """The job path of one run: its actors, executors and threads, and their shutdown."""

    name = "jobs"

    def __init__(
        self,
        *,
        settings: WorkerSettings,
        tasks: Mapping[str, Callable[..., Any]],
        no_log_success: bool,
        listen_connection_string: str | None = None,
        pool_id: str | None = None,
        outcome_observer: OutcomeObserverFactory | None = None,
    ) -> None:
        self.settings = settings
        self._outcome_observer = outcome_observer
        self.pool_id = pool_id or new_pool_id(settings.once)
        self._listen_connection_string = listen_connection_string
        self._guard = CrashGuard(settings.concurrency)
        # Read from the declarations, before the crash guard wraps the handlers.
        self._timeouts = task_timeouts(tasks, settings.timeout_s)
        self._tasks = {name: self._guard.wrap(name, handler) for name, handler in tasks.items()}
        self._no_log_success = no_log_success
        self._host: Host | None = None
        self.ctx: WorkerContext | None = None
        self._liveness: pykka.ActorRef[Liveness] | None = None
        self._claimer: pykka.ActorRef[Claimer] | None = None
        self._completer: pykka.ActorRef[Completer] | None = None
        self._sweeper: pykka.ActorRef[Sweeper] | None = None
        self._executors: ExecutorPool | None = None
        self._aio: AsyncJobs | None = None
        self._listener: Listener | None = None
        self._outcomes: OutcomeObserver | None = None
        self._outbox: Outbox | None = None
        self._message = GRACEFUL_MESSAGE
        self._forceful = False

    # --- starting -------------------------------------------------------------------

    def start(self, host: Host) -> None:
        """Start every job actor on ``host``'s pool and bus; raises on failure (the host
        then closes this service)."""
        if starting_in_spawned_child():
            raise KongtaskError(
                "a kongtask worker was started while a process-pool child imported the main "
                "script again (multiprocessing spawn); start the worker under "
                '`if __name__ == "__main__":`'
            )
        self._host = host
        settings = self.settings
        pool, conninfo = host.pool, host.conninfo
        assert pool is not None and conninfo is not None, "the host opens the pool first"

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
            clock=host.clock,
            bus=host.bus,
            queue=local_queue,
            fatal=self._fatal,
            request_shutdown=host.request_shutdown,
            run=host.status,
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
        host.bus.emit(events.pool_create, pool_id=self.pool_id)
        # The liveness record exists before anything is claimed, so a pool id
        # seen in locked_by without a live record always means a dead pool.
        self._liveness = Liveness.start(
            ctx, self._nudge, self._lock_conninfo(conninfo), self._stuck_threads
        )
        if self._liveness.ask(Register(), timeout=_POOL_OPEN_TIMEOUT_S) is not True:
            raise KongtaskError(f"pool {self.pool_id} could not register its liveness record")
        outbox = Outbox(wake=self._flush_outcomes)
        self._claimer = Claimer.start(ctx, outbox)
        self._completer = Completer.start(ctx, outbox, self._claimer)
        self._outbox = outbox
        if not settings.once:
            self._start_listener(ctx, conninfo)
        # The observer (kongtask's cron history, given by the Runner) sees each
        # batch the completer writes: the executors know nothing of it.
        if self._outcome_observer is not None:
            outcomes = self._outcome_observer(
                connect=pool.connection, queries=ctx.queries, clock=host.clock
            )
            outcomes.start()
            self._outcomes = outcomes
            ctx.outcome_observer = outcomes
        if any(is_async_handler(handler) for handler in self._tasks.values()):
            # One event loop per Runner, only when some handler is async.
            self._aio = AsyncJobs(ctx)
            self._aio.start()
        self._executors = ExecutorPool(
            ctx,
            outbox,
            on_all_stopped=lambda: host.send(WorkersStopped()),
            confirm=self._confirm,
            timeouts=self._timeouts,
            aio=self._aio,
        )
        self._executors.start()
        if not settings.once:
            self._sweeper = Sweeper.start(ctx, self._nudge)
        self._nudge()

    def ready(self) -> None:
        """Log that the worker is up (once every service runs and signals are handled)."""
        logger.info(
            "Worker connected and looking for jobs... (pool %s, task names: %s)",
            self.pool_id,
            ", ".join(f"'{name}'" for name in self._tasks) or "none",
        )

    def _lock_conninfo(self, conninfo: str) -> str | None:
        """Where the pool holds its liveness lock: a direct session (None: none to be had)."""
        if self.settings.dead_pool_check_interval_s is None:
            return None
        if self._listen_connection_string is not None:
            return self._listen_connection_string
        if self.settings.pgbouncer:
            logger.warning(
                "pgbouncer=True and no listen_connection_string: the pool holds no liveness "
                "lock (a session lock cannot live through transaction pooling), so if this "
                "process dies its jobs wait for the heartbeat bound (pool_dead_after_s = %g s). "
                "Set listen_connection_string (--listen-connection) to a direct PostgreSQL "
                "connection for release within seconds.",
                self.settings.pool_dead_after_s,
            )
            return None
        return conninfo

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
        self._listener = Listener(
            ctx,
            self._insert_notified,
            conninfo=conninfo,
            on_cancel=self._cancel_notified,
            on_limits=self._limits_changed,
        )
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

    def _limits_changed(self) -> None:
        if self._claimer is not None:
            self._claimer.tell(LimitsChanged())

    def _cancel_notified(self, data: dict[str, Any]) -> None:
        """A ``kongtask:cancel`` notice: the executors abort the job if this pool holds it."""
        executors, ctx = self._executors, self.ctx
        if executors is None or ctx is None:
            return
        notice = read_notice(data, self.settings.schema, self.pool_id)
        if notice is None:
            return
        running = executors.cancel(notice.job_id, notice.message)
        logger.info(
            "Job %s was cancelled (%s)%s",
            notice.job_id,
            notice.message,
            "; its abort event is set" if running else "; it will not start",
        )

    def _stuck_threads(self) -> int:
        return self.stuck_threads

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

    # --- what others read -------------------------------------------------------------

    @property
    def worker_ids(self) -> list[str]:
        """The ids of the executors, once started."""
        return list(self._executors.worker_ids) if self._executors is not None else []

    @property
    def executors_busy(self) -> int:
        """How many jobs are running now (async ones in flight included)."""
        return len(self._executors.running()) if self._executors is not None else 0

    @property
    def stuck_threads(self) -> int:
        """Executor threads still inside a handler that ran past its timeout."""
        return self._executors.stuck_threads if self._executors is not None else 0

    @property
    def listening(self) -> bool | None:
        """True while LISTEN is connected; None when this service does not listen."""
        listener = self._listener
        return None if listener is None else listener.connected.is_set()

    def parts(self) -> list[Part]:
        """The claimer, completer, sweeper, liveness actors, the listener and the executors."""
        parts: list[Part] = [
            ActorPart(name, ref)
            for name, ref in (
                ("claimer", self._claimer),
                ("completer", self._completer),
                ("sweeper", self._sweeper),
                ("liveness", self._liveness),
            )
            if ref is not None
        ]
        if self._listener is not None:
            parts.append(self._listener.part())
        if self._outcomes is not None:
            parts.append(self._outcomes.part())
        executors = self._executors
        if executors is not None:
            parts.append(
                ThreadsPart("executors", executors.threads, busy=lambda: len(executors.running()))
            )
        if self._aio is not None:
            parts.append(ThreadsPart("event loop", self._aio.threads))
        return parts

    def join(self, timeout_s: float) -> None:
        """Wait until nothing runnable is claimed, running or unrecorded (TimeoutError)."""
        claimer = self._claimer
        if claimer is None or self._host is None or self._host.status.stopped:
            return
        idle = threading.Event()
        claimer.tell(JoinRequest(idle))
        if not idle.wait(timeout_s):
            held = self._ask(claimer, HeldCount())
            raise TimeoutError(f"the worker still had {held} job(s) in hand after {timeout_s}s")

    def _fatal(self, action: str, exc: BaseException) -> None:
        assert self._host is not None
        self._host.bus.emit(events.pool_fatal_error, pool_id=self.pool_id, error=exc, action=action)
        message = f"{action} failed: {exc}"
        if isinstance(exc, _PREPARED_STATEMENT_ERRORS) and not self.settings.pgbouncer:
            message += (
                " (prepared statements are lost or doubled: is the connection going through "
                "pgbouncer in transaction pooling? Then run with pgbouncer=True / --pgbouncer)"
            )
        self._host.fail(message, exc)

    def reload(self) -> bool:
        """Nothing on the job path reloads."""
        return False

    # --- stopping -------------------------------------------------------------------

    def announce(self, cause: ControlMessage) -> None:
        """Emit and log why the pool stops; remember the message and whether it is forced."""
        assert self._host is not None
        bus = self._host.bus
        match cause:
            case OsSignal(signum=signum):
                name = signal.Signals(signum).name
                bus.emit(events.graceful_shutdown, signal=name)
                logger.info("Received %s; shutting down gracefully (send again to force)", name)
                self._message = f"{GRACEFUL_MESSAGE} ({name})"
            case Stop():
                bus.emit(events.stop)
            case Kill():
                bus.emit(events.stop)
                self._message, self._forceful = FORCEFUL_MESSAGE, True
            case Fatal(message=message):
                logger.error("Shutting down worker pool %s: %s", self.pool_id, message)
                self._message = message
            case ShutdownRequested(message=message):
                logger.info("%s", message)
                self._message = message
            case _:
                pass
        signal_name = (
            events.pool_forceful_shutdown if self._forceful else events.pool_graceful_shutdown
        )
        bus.emit(signal_name, pool_id=self.pool_id, message=self._message)

    def shutdown(self, cause: ControlMessage) -> None:
        """Give back buffered jobs, drain or abort the running ones, flush, deregister."""
        host = self._host
        assert host is not None and self._executors is not None and self._outbox is not None
        message, forceful = self._message, self._forceful
        force_failed: list[Any] = []
        try:
            if forceful:
                host.abort()
            if self._listener is not None:
                self._listener.stop(host.step_timeout())
            if self._sweeper is not None:
                self._sweeper.tell(StopTimers())
            self._ask(self._claimer, Shutdown())
            self._executors.release()
            executors = self._executors
            forceful = forceful or host.wait_drained(
                executors.all_stopped, self.settings.graceful_shutdown_abort_timeout_s
            )
            if not forceful:
                self._executors.signal_abort()
            host.begin_grace(SHUTDOWN_GRACE_S)
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
                host.bus.emit(events.worker_stop, worker_id=worker_id, error=None)
        except Exception as exc:
            logger.exception("Shutting down worker pool %s failed", self.pool_id)
            error_signal = (
                events.pool_forceful_shutdown_error
                if forceful
                else events.pool_graceful_shutdown_error
            )
            host.bus.emit(error_signal, pool_id=self.pool_id, error=exc)
            if host.error is None:
                host.error = exc
        else:
            if forceful:
                host.bus.emit(
                    events.pool_forceful_shutdown_complete,
                    pool_id=self.pool_id,
                    force_failed_jobs=force_failed,
                )
            else:
                host.bus.emit(events.pool_graceful_shutdown_complete, pool_id=self.pool_id)

    def _ask(self, ref: pykka.ActorRef[Any] | None, message: object) -> Any:
        if ref is None or self._host is None:
            return None
        timeout = self._host.step_timeout()
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

    def close(self) -> None:
        """Stop exactly the actors and threads this service started; never raises."""
        host = self._host
        step = host.step_timeout if host is not None else (lambda: 2.0)
        if self.ctx is not None:
            self.ctx.queue.close()
        for ref in (self._sweeper, self._claimer, self._completer, self._liveness):
            if ref is not None:
                try:
                    ref.stop(timeout=step())
                except (pykka.ActorDeadError, pykka.Timeout):
                    pass
        if self._listener is not None:
            self._listener.stop(step())
        if self._outcomes is not None:
            self._outcomes.stop()
        if self._aio is not None:
            self._aio.stop(step())
        if self._executors is not None:
            self._executors.close()
        self._guard.close()
        if self.ctx is not None and host is not None:
            host.bus.emit(events.pool_release, pool_id=self.pool_id)


def task_timeouts(
    tasks: Mapping[str, Callable[..., Any]], default_s: float | None
) -> dict[str, float]:
    """Each task's timeout: its declared ``timeout_s``, else the worker's default (if any)."""
    timeouts: dict[str, float] = {}
    for name, handler in tasks.items():
        task = declared(handler)
        timeout_s = task.timeout_s if task is not None and task.timeout_s is not None else default_s
        if timeout_s is not None:
            timeouts[name] = float(timeout_s)
    return timeouts
