"""The public worker API: ``run()``, ``run_once()`` and the ``Runner`` handle.

A Runner is configuration until it starts: the constructor validates every
option (errors name the parameter) and opens nothing. ``start()`` connects,
migrates and starts the actors in the background; ``stop()`` drains
gracefully, ``kill()`` forces, ``wait()`` blocks until it has stopped. The
Runner itself holds no job logic: the actors in :mod:`kongtask.jobs` and
:mod:`kongtask.cron.service` do the work. A Runner is a
:class:`~kongtask.runtime.host.Host` (pool, bus, clock, signals, run state,
control loop) running the :class:`~kongtask.jobs.supervisor.JobService` and,
with a crontab, the cron service; each stops exactly what it started.
Several Runners (different schemas or databases) can share a process; each
sends its events with itself as the blinker sender.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any, Self, TypedDict, TypeVar, Unpack

from kongtask import events
from kongtask.cron.service.outcomes import OutcomeRecorder
from kongtask.declared import Task, declared, job_spec_for
from kongtask.errors import ConfigurationError, KongtaskError
from kongtask.job import Job
from kongtask.job_spec import JobSpec
from kongtask.jobs.context import WorkerContext, new_pool_id
from kongtask.jobs.enqueue import add_job_on, add_jobs_on
from kongtask.jobs.supervisor import JobService
from kongtask.protocols import Clock
from kongtask.runtime.control import Kill, Stop
from kongtask.runtime.host import Host
from kongtask.runtime.parts import Part, probe_parts
from kongtask.settings import ConnectionSettings, OpsSettings, WorkerSettings
from kongtask.validate import check_clock, check_connection_string

if TYPE_CHECKING:
    # The cron stack is imported only by a Runner given a crontab: the others
    # start sooner without it.
    from kongtask.cron.service.scheduling import SchedulingService
    from kongtask.cron.source import CrontabSource
    from kongtask.cron.types import ParsedCronItem
    from kongtask.scheduler import Scheduler

__all__ = ["RUNNER_OPTIONS", "Runner", "RunnerLoad", "RunnerOptions", "run", "run_once"]

logger = logging.getLogger(__name__)

_MAX_TASK_IDENTIFIER_LENGTH = 128

_S = TypeVar("_S", WorkerSettings, ConnectionSettings, OpsSettings)


class _RequiredRunnerOptions(TypedDict):
    #: Task identifier -> ``handler(payload, helpers)``, or declared tasks (``@kongtask.task``).
    tasks: Mapping[str, Callable[..., Any]] | Iterable[Task]


class RunnerOptions(_RequiredRunnerOptions, total=False):
    """The keyword options of :class:`Runner`, :func:`run`, :func:`run_once` and
    :func:`kongtask.testing.running`, one definition for all four.

    Besides ``tasks`` (required) and the connection, clock and crontab
    options, the settings come either grouped (``settings``, ``connection``,
    ``ops``) or one by one under their field names, which build the groups;
    each field's default and rule are those of its dataclass
    (:class:`~kongtask.settings.WorkerSettings`,
    :class:`~kongtask.settings.ConnectionSettings`,
    :class:`~kongtask.settings.OpsSettings`). A field given both ways is refused.
    """

    #: Else ``DATABASE_URL``, the ``PG*`` variables, or the embedded server.
    connection_string: str | None
    #: A direct connection for LISTEN when ``connection_string`` goes through pgbouncer.
    listen_connection_string: str | None
    clock: Clock | None
    #: The crontab as text, as a file (re-read on SIGHUP) or as parsed items: one of them.
    crontab: str | None
    crontab_file: str | Path | None
    cron_items: Sequence[ParsedCronItem] | None
    # The groups.
    settings: WorkerSettings
    connection: ConnectionSettings
    ops: OpsSettings
    # WorkerSettings, one by one (``schema=None`` means its default).
    schema: str | None
    concurrency: int
    poll_interval_s: float
    forbidden_flags: Sequence[str] | None
    max_pool_size: int
    prepared_statements: bool
    graceful_shutdown_abort_timeout_s: float
    install_signal_handlers: bool | None
    local_queue_size: int | None
    local_queue_ttl_s: float
    size_claims: bool
    min_reset_locked_interval_s: float
    max_reset_locked_interval_s: float
    lock_expiry: str
    once: bool
    heartbeat_interval_s: float
    pool_dead_after_s: float
    dead_pool_check_interval_s: float | None
    crash_quarantine_after: int
    vacuum_after_dead_rows: int | None
    timeout_s: float | None
    # ConnectionSettings, one by one.
    connect_timeout_s: float
    statement_timeout_s: float | None
    keepalives_idle_s: int
    keepalives_interval_s: int
    keepalives_count: int
    tcp_user_timeout_s: float
    pgbouncer: bool
    # OpsSettings, one by one: serve /metrics, /healthz and /readyz (kongtask.ops.health).
    metrics_port: int | None
    metrics_host: str


#: Every option name :class:`RunnerOptions` lists.
RUNNER_OPTIONS: frozenset[str] = RunnerOptions.__required_keys__ | RunnerOptions.__optional_keys__


class Runner:
    """A worker pool processing jobs in the background; see :func:`run`.

    Takes the keyword options of :class:`RunnerOptions`: the settings as
    ``settings=``/``connection=``/``ops=`` objects or field by field. Use it
    as a context manager (start on enter, graceful stop on exit) or call
    :meth:`start` and later :meth:`stop`.
    """

    def __init__(self, **options: Unpack[RunnerOptions]) -> None:
        _check_option_names(options)
        if "tasks" not in options:
            raise ConfigurationError(
                "tasks is required: a mapping of task identifier to handler, or declared tasks",
                name="tasks",
            )
        self._tasks = _check_tasks(options["tasks"])
        #: The ops server's settings (``metrics_port``/``metrics_host``).
        self.ops_settings = _settings_of(options, "ops", OpsSettings)
        self._metrics_port = self.ops_settings.metrics_port
        self._metrics_host = self.ops_settings.metrics_host
        self.ops_server: Any = None
        connection_string = options.get("connection_string")
        check_connection_string(connection_string)
        clock = options.get("clock")
        check_clock(clock)
        self._crontab = _crontab_source(options)
        #: The pool's settings, its connection settings included.
        self.settings = _worker_settings(options)
        listen_connection_string = options.get("listen_connection_string")
        check_connection_string(
            listen_connection_string, name="listen_connection_string", allow_empty=False
        )
        self._listen_connection_string = listen_connection_string
        self._connection_string = connection_string
        self._clock = clock
        self._run: _Run | None = None

    # --- identity ---------------------------------------------------------------------

    @property
    def events(self) -> ModuleType:
        """The :mod:`kongtask.events` module (the blinker signals); connect with
        ``sender=runner`` for this Runner's events."""
        return events

    @property
    def pool_id(self) -> str | None:
        """This run's pool id (``pool-…``/``otpool-…``, stored in ``locked_by``), once started."""
        return self._run.jobs.pool_id if self._run is not None else None

    @property
    def worker_ids(self) -> list[str]:
        """The ids of this run's executors, once started."""
        return self._run.jobs.worker_ids if self._run is not None else []

    @property
    def running(self) -> bool:
        """True between a successful start and the end of the shutdown."""
        return self._run is not None and not self._run.host.status.stopped

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> Self:
        """Connect, migrate, start the actors and return at once (raises if that fails)."""
        if self._run is not None:
            raise KongtaskError("this Runner was already started; make a new one to run again")
        # Parse the crontab before connecting: a bad line fails the start with
        # its line number and nothing is touched (not even the migrations).
        # Run-once mode schedules no cron, but a bad crontab is still an error.
        crontab, cron_items = self._crontab, None
        if crontab is not None:
            cron_items = crontab.load()
            _warn_unserved_tasks(cron_items, self._tasks, crontab)
        if self.settings.once and crontab is not None:
            logger.info("'Run once' mode runs no cron; %s was only checked", crontab.description)
            crontab, cron_items = None, None
        if self._metrics_port is not None:
            from kongtask.ops.health import OpsServer

            # Made before the actors start, so the metrics count every event;
            # bound before connecting, so a taken port fails the start with
            # nothing connected (not even the embedded server started).
            ops_server = OpsServer.for_runner(
                self, host=self._metrics_host, port=self._metrics_port
            )
            try:
                ops_server.bind()
            except BaseException:
                ops_server.stop()
                raise
            self.ops_server = ops_server
        pool_id = new_pool_id(self.settings.once)
        host = Host(sender=self, name=pool_id, clock=self._clock)
        jobs = JobService(
            settings=self.settings,
            tasks=self._tasks,
            no_log_success=bool(os.environ.get("NO_LOG_SUCCESS")),
            listen_connection_string=self._listen_connection_string,
            pool_id=pool_id,
            # Outcomes of cron jobs this pool runs go into kongtask's cron history.
            outcome_observer=OutcomeRecorder,
        )
        cron = self._cron_service(crontab, cron_items, pool_id)
        self._run = _Run(host, jobs, cron, _scheduler_view(host, cron))
        # The permanent-failure line (kept off the executor's hot path: it is
        # an ordinary receiver of job:failed).
        events.job_failed.connect(_log_giving_up, sender=self)
        settings = self.settings
        try:
            try:
                host.open_database(
                    self._connection_string,
                    schema=settings.schema,
                    settings=settings.connection,
                    pool_name=pool_id,
                    min_size=2,
                    max_size=settings.max_pool_size,
                    prepared_statements=settings.prepared_statements,
                )
            except BaseException:
                host.close()
                raise
            services: list[Any] = [jobs] if cron is None else [jobs, cron]
            host.start(services, install_signals=settings.install_signal_handlers is not False)
        except BaseException:
            if self.ops_server is not None:
                self.ops_server.stop()  # give the port back
            raise
        if self.ops_server is not None:
            try:
                self.ops_server.start()
            except BaseException:
                self.kill()
                raise
        return self

    def _cron_service(
        self,
        crontab: CrontabSource | None,
        items: list[ParsedCronItem] | None,
        pool_id: str,
    ) -> SchedulingService | None:
        """The cron service of this run's crontab, on the Runner's pool, bus and clock."""
        if crontab is None:
            return None
        from kongtask.cron.service.scheduling import SchedulingService

        code = list(crontab.items) if crontab.items is not None else []
        file_or_text = None if crontab.items is not None else crontab
        return SchedulingService(
            schema=self.settings.schema,
            source=file_or_text,
            items=items if file_or_text is not None else None,
            code_items=code,
            backfill_on_start=True,
            clock_skew_tolerance_s=10.0,
            stored_items=True,
            check_interval_s=10.0,
            history_retention=timedelta(days=30),
            node_name=pool_id,
            log=logging.getLogger("kongtask.cron"),
            announce_signals=False,
        )

    def reload_crontab(self, timeout: float | None = 30.0) -> bool:
        """Re-read the crontab file now (what SIGHUP does); True if the new one took effect.

        A file that fails to load changes nothing: the previous schedule keeps
        running, the error is logged with its line and ``cron:reloadFailed``
        is emitted. Minutes are neither skipped nor doubled across a reload.
        """
        return self.scheduler.reload(timeout)

    @property
    def scheduler(self) -> Scheduler:
        """The :class:`kongtask.Scheduler` running this Runner's crontab."""
        run = self._run
        if run is None or run.scheduler is None or run.host.status.stopped:
            raise KongtaskError("this Runner has no crontab (or is not running)")
        return run.scheduler

    def get_cron_items(self) -> list[ParsedCronItem]:
        """The cron items being scheduled now (see :meth:`Scheduler.get_cron_items`)."""
        return self.scheduler.get_cron_items()

    def reload_cron_items(self, items: Sequence[Any] | None = None) -> bool:
        """Re-read the crontab (``None``) or replace the code items (a list); see
        :meth:`Scheduler.reload_cron_items`."""
        return self.scheduler.reload_cron_items(items)

    def stop(self, timeout: float | None = None) -> bool:
        """Drain gracefully and wait up to ``timeout`` seconds; True once stopped.

        Buffered jobs are given back, running jobs get up to
        ``graceful_shutdown_abort_timeout_s`` to finish, then their abort
        events are set and they are failed back so they retry.
        """
        if self._run is None:
            return True
        self._run.host.send(Stop())
        return self.wait(timeout)

    def kill(self, timeout: float | None = None) -> bool:
        """Stop now: running jobs are failed back at once (they retry later)."""
        if self._run is None:
            return True
        self._run.host.send(Kill())
        return self.wait(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the Runner has stopped; False on timeout.

        Raises :class:`KongtaskError` if it stopped because of a fatal error.
        """
        run = self._run
        if run is None:
            return True
        host = run.host
        if not host.status.wait_stopped(timeout):
            return False
        host.restore_signals()
        if host.error is not None:
            raise KongtaskError(f"worker pool {host.name} failed: {host.error}") from host.error
        return True

    def join(self, timeout: float = 30.0) -> None:
        """Wait until every job runnable by the Runner's clock has been run and recorded,
        cron jobs of minutes already passed included (raises TimeoutError)."""
        run = self._run
        if run is None:
            raise KongtaskError("the Runner has not been started")
        if run.host.status.stopped:
            return
        # Real time even with a manual clock: a test's handlers run on real threads.
        deadline = time.monotonic() + timeout
        if run.cron is not None and not run.cron.wait_caught_up(timeout):
            raise TimeoutError(f"cron had not caught up with its clock after {timeout}s")
        run.jobs.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> Self:
        if self._run is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- enqueueing -------------------------------------------------------------------

    def add_job(
        self,
        identifier: str | Task,
        payload: Any = None,
        *,
        queue_name: str | None = None,
        run_at: datetime | None = None,
        max_attempts: int | None = None,
        job_key: str | None = None,
        job_key_mode: str | None = None,
        priority: int | None = None,
        flags: Sequence[str] | None = None,
    ) -> Job:
        """Add a job through this Runner's pool (same arguments as ``WorkerUtils.add_job``)."""
        spec = job_spec_for(
            identifier,
            payload,
            queue_name=queue_name,
            run_at=run_at,
            max_attempts=max_attempts,
            job_key=job_key,
            job_key_mode=job_key_mode,
            priority=priority,
            flags=flags,
        )
        ctx = self._context()
        with ctx.pool.connection() as conn:
            return add_job_on(conn, ctx.queries, spec)

    def add_jobs(
        self, specs: Iterable[JobSpec | Mapping[str, Any]], *, job_key_preserve_run_at: bool = False
    ) -> list[Job]:
        """Add many jobs in one statement (same arguments as ``WorkerUtils.add_jobs``)."""
        ctx = self._context()
        with ctx.pool.connection() as conn:
            return add_jobs_on(
                conn, ctx.queries, specs, job_key_preserve_run_at=job_key_preserve_run_at
            )

    # --- read-only views for metrics and health probes --------------------------------

    def load(self) -> RunnerLoad | None:
        """How busy the executors and the local queue are right now; ``None`` unless running."""
        run = self._run
        if run is None or run.jobs.ctx is None or run.host.status.stopped:
            return None
        queue = run.jobs.ctx.queue
        return RunnerLoad(
            concurrency=self.settings.concurrency,
            executors_busy=run.jobs.executors_busy,
            local_queue_jobs=len(queue),
            local_queue_size=queue.size,
            stuck_threads=run.jobs.stuck_threads,
        )

    def parts(self) -> list[Part]:
        """Every actor and thread group of this run (the publisher, the job path's, cron's),
        each with a name, a probe and stats; empty unless running."""
        run = self._run
        return run.host.parts() if run is not None else []

    def probe(self, timeout_s: float = 0.5) -> dict[str, dict[str, Any]]:
        """Ask every part (cron's too) to answer within ``timeout_s``.

        Returns part name -> ``{"ok": bool, ...}``: ``error`` says why a part
        is not ok (a stuck or stopped actor, ended threads); ``waiting`` marks
        an actor inside a database call, which is not stuck. Never waits on
        the database. Empty unless running.
        """
        return probe_parts(self.parts(), timeout_s)

    def now(self) -> datetime:
        """The time by this Runner's clock (a test's ManualClock), else the system's."""
        return self._clock.now() if self._clock is not None else datetime.now(UTC)

    def cron_lag_s(self) -> float | None:
        """How far this Runner's cron is behind (see :meth:`Scheduler.lag_s`); ``None``
        without a crontab or when not running."""
        run = self._run
        return run.cron.lag_s() if run is not None and run.cron is not None else None

    @property
    def listening(self) -> bool | None:
        """True while LISTEN is connected; ``None`` when this Runner does not listen (run once)."""
        run = self._run
        return run.jobs.listening if run is not None else None

    @contextmanager
    def connection(self, timeout_s: float = 5.0) -> Iterator[Any]:
        """A connection from this Runner's pool for the ``with`` block (waits ``timeout_s``)."""
        ctx = self._context()
        with ctx.pool.connection(timeout=timeout_s) as conn:
            yield conn

    def _context(self) -> WorkerContext:
        run = self._run
        if run is None or run.jobs.ctx is None or run.host.status.stopped:
            raise KongtaskError("the Runner is not running; start it first")
        return run.jobs.ctx


@dataclass(frozen=True, slots=True)
class _Run:
    """One start of a Runner: its host, its job service, its cron service and that
    service's Scheduler view."""

    host: Host
    jobs: JobService
    cron: SchedulingService | None
    scheduler: Scheduler | None


@dataclass(frozen=True, slots=True)
class RunnerLoad:
    """A Runner's executors and local queue at one instant (see :meth:`Runner.load`)."""

    concurrency: int
    executors_busy: int
    local_queue_jobs: int
    local_queue_size: int
    #: Executor threads still inside a handler that ran past its timeout (their slots
    #: were given to new threads).
    stuck_threads: int = 0


_worker_logger = logging.getLogger("kongtask.worker")


def _log_giving_up(runner: Runner, *, job: Job, error: Any, **_: Any) -> None:
    """Say plainly that a job used its last attempt and will not run again."""
    from kongtask.jobs.executor import error_message

    message = error_message(error) if isinstance(error, BaseException) else str(error)
    _worker_logger.error(
        "Giving up on job %s (%s) after %d attempt(s): %s",
        job.id,
        job.task_identifier,
        job.attempts,
        message,
        extra={
            "job_id": job.id,
            "task": job.task_identifier,
            "attempt": job.attempts,
            "max_attempts": job.max_attempts,
            "queue_id": job.job_queue_id,
            "pool": runner.pool_id,
        },
    )


def run(**options: Unpack[RunnerOptions]) -> Runner:
    """Start a worker in the background and return its :class:`Runner` at once.

    Takes the options of :class:`RunnerOptions` (all keyword-only): ``tasks``,
    ``connection_string`` and the rest, either one by one or grouped as
    ``settings=WorkerSettings(...)``, ``connection=ConnectionSettings(...)``
    and ``ops=OpsSettings(...)``. An unknown option is a
    :class:`~kongtask.errors.ConfigurationError` naming it. The schema is
    migrated first.
    """
    return Runner(**options).start()


def run_once(**options: Unpack[RunnerOptions]) -> Runner:
    """Run every job that is runnable now, then stop; returns the stopped Runner.

    Takes the options of :func:`run`. Like graphile-worker's ``--once``, it
    neither listens for new jobs nor sweeps stale locks, and runs no cron (a
    crontab given is still parsed: a bad one fails the start with its line).
    """
    settings = options.get("settings")
    if isinstance(settings, WorkerSettings):
        options["settings"] = replace(settings, once=True)
    else:
        options["once"] = True
    runner = Runner(**options).start()
    runner.wait()
    return runner


def _check_option_names(options: Mapping[str, Any]) -> None:
    """Refuse an option :class:`RunnerOptions` does not list, naming it and its close matches."""
    known = sorted(RUNNER_OPTIONS)
    for name in options:
        if name in RUNNER_OPTIONS:
            continue
        close = difflib.get_close_matches(name, known, n=3)
        hint = (
            f"did you mean {' or '.join(close)}?"
            if close
            else f"the options are {', '.join(known)}"
        )
        raise ConfigurationError(f"unknown option {name!r}; {hint}", name=name)


def _settings_of(options: Mapping[str, Any], key: str, kind: type[_S]) -> _S:
    """The settings object given as ``key=``, else one built from its fields given one by one.

    Giving both (``ops=OpsSettings(...)`` and ``metrics_port=``) is refused
    rather than one silently winning over the other.
    """
    names = {f.name for f in fields(kind)} - {"connection"}
    loose = {name: options[name] for name in sorted(names) if name in options}
    given = options.get(key)
    if given is None:
        return kind(**loose)
    if not isinstance(given, kind):
        raise ConfigurationError(
            f"{key} must be a kongtask.{kind.__name__}, got {type(given).__name__}",
            name=key,
            value=given,
        )
    if loose:
        raise ConfigurationError(
            f"{', '.join(loose)} given beside {key}=; set "
            f"{'it' if len(loose) == 1 else 'them'} in the {kind.__name__} instead",
            name=next(iter(loose)),
            value=None,
        )
    return given


def _worker_settings(options: Mapping[str, Any]) -> WorkerSettings:
    """The :class:`WorkerSettings` the options describe, with their :class:`ConnectionSettings`."""
    if options.get("schema", 0) is None:
        # schema=None means the default (GRAPHILE_WORKER_SCHEMA, else graphile_worker).
        options = {name: value for name, value in options.items() if name != "schema"}
    connection = _settings_of(options, "connection", ConnectionSettings)
    settings = _settings_of(options, "settings", WorkerSettings)
    if "settings" not in options or options["settings"] is None:
        return replace(settings, connection=connection)
    connection_given = "connection" in options or any(
        f.name in options for f in fields(ConnectionSettings)
    )
    if not connection_given or settings.connection == connection:
        return settings
    if settings.connection != ConnectionSettings():
        raise ConfigurationError(
            "connection settings given both in settings=WorkerSettings(connection=...) and "
            "beside it; give them once",
            name="connection",
            value=None,
        )
    return replace(settings, connection=connection)


def _crontab_source(options: RunnerOptions) -> CrontabSource | None:
    """The Runner's crontab from its three crontab options; None (and no cron
    module imported) when none is given."""
    crontab = options.get("crontab")
    crontab_file = options.get("crontab_file")
    cron_items = options.get("cron_items")
    if crontab is None and crontab_file is None and cron_items is None:
        return None
    from kongtask.cron.source import CrontabSource

    return CrontabSource.of(crontab=crontab, crontab_file=crontab_file, cron_items=cron_items)


def _scheduler_view(host: Host, cron: SchedulingService | None) -> Scheduler | None:
    """The Scheduler view of a run's cron service (None without one)."""
    if cron is None:
        return None
    from kongtask.scheduler import Scheduler

    return Scheduler._view(host, cron)


def _warn_unserved_tasks(
    items: Sequence[ParsedCronItem], tasks: Mapping[str, Any], source: CrontabSource
) -> None:
    """Warn about cron items whose task this worker has no handler for.

    Not an error: another worker sharing the database may serve the task; but
    a misspelt task name would otherwise only show as jobs that never run.
    """
    for item in items:
        if item.task in tasks:
            continue
        place = source.description
        if item.source_line is not None:
            place = f"line {item.source_line} of {place}"
        logger.warning(
            "Cron item %r (%s) names task %r, which this worker has no handler for;"
            " its jobs wait for a worker that has one",
            item.identifier,
            place,
            item.task,
        )


def _check_tasks(tasks: Any) -> dict[str, Callable[..., Any]]:
    """The task map of a worker, from a mapping name -> handler or from declared tasks.

    A declared :class:`~kongtask.Task` stays the map's value (the worker reads
    its options); the checks on the handler apply to the function it declares.
    """
    checked: dict[str, Callable[..., Any]] = {}
    for identifier, handler in _task_entries(tasks):
        if not isinstance(identifier, str) or not identifier:
            raise ConfigurationError(
                f"task identifiers must be non-empty strings, got {identifier!r}",
                name="tasks",
                value=identifier,
            )
        if len(identifier) > _MAX_TASK_IDENTIFIER_LENGTH:
            raise ConfigurationError(
                f"task identifier {identifier[:40]!r}... is {len(identifier)} characters long; "
                f"at most {_MAX_TASK_IDENTIFIER_LENGTH} are allowed",
                name="tasks",
                value=identifier,
            )
        if "\x00" in identifier or not _is_utf8(identifier):
            raise ConfigurationError(
                f"task identifier {identifier!r} contains a NUL character or a lone surrogate, "
                "which PostgreSQL cannot store",
                name="tasks",
                value=identifier,
            )
        task = declared(handler)
        fn = handler if task is None else task.fn
        if task is not None and task.name != identifier:
            raise ConfigurationError(
                f"tasks maps {identifier!r} to the declared task {task.name!r}; a declared "
                "task runs under its own name (use that key, or pass a list of tasks)",
                name="tasks",
                value=identifier,
            )
        if not callable(fn):
            raise ConfigurationError(
                f"the handler for task {identifier!r} is not callable: {fn!r}",
                name="tasks",
                value=handler,
            )
        if inspect.isasyncgenfunction(fn):
            # Calling it would only create an async generator: the body would never run.
            raise ConfigurationError(
                f"the handler for task {identifier!r} is an async generator function; its "
                "body would never run (use async def without yield)",
                name="tasks",
                value=handler,
            )
        if inspect.isgeneratorfunction(fn):
            # Calling it would only create a generator: the body would never run.
            raise ConfigurationError(
                f"the handler for task {identifier!r} is a generator function; its body "
                "would never run",
                name="tasks",
                value=handler,
            )
        checked[identifier] = handler
    return checked


def _task_entries(tasks: Any) -> list[tuple[Any, Any]]:
    """(identifier, handler) pairs of a ``tasks=`` mapping, or of an iterable of
    declared tasks keyed by their names (a name given twice is refused)."""
    if isinstance(tasks, Mapping):
        return list(tasks.items())
    if isinstance(tasks, str | bytes) or not isinstance(tasks, Iterable):
        raise ConfigurationError(
            "tasks must be a mapping of task identifier to handler or a list of "
            f"declared tasks (@kongtask.task), got {type(tasks).__name__}",
            name="tasks",
            value=tasks,
        )
    entries: dict[str, Task] = {}
    for index, item in enumerate(tasks):
        task = declared(item)
        if task is None:
            raise ConfigurationError(
                f"tasks[{index}] is not a declared task (@kongtask.task): {item!r}; "
                "give plain handlers in a mapping of identifier to handler",
                name="tasks",
                value=item,
            )
        if task.name in entries:
            raise ConfigurationError(
                f"tasks[{index}] declares the task name {task.name!r} a second time",
                name="tasks",
                value=task.name,
            )
        entries[task.name] = task
    return list(entries.items())


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
