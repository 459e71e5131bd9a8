"""Prometheus metrics for kongtask, with the ``prometheus_client`` library (the ``metrics`` extra).

Job and cron counters and histograms come from the Runner's blinker events
(:mod:`kongtask.events`), so counting never touches the hot path; gauges of
the executors and the local queue are read from :meth:`Runner.load` at
scrape time; queue depth by task and state is sampled from the database (one
truth for a whole fleet, whichever node is scraped), at most every
``depth_max_age_s`` seconds.

Serve them with ``kongtask --metrics-port PORT`` or ``run(metrics_port=...)``
(see :mod:`kongtask.ops.health`), or put them in a host's own registry::

    metrics = kongtask.ops.metrics.register(registry, runner=runner)

Metric names (all prefixed ``kongtask_``): ``jobs_started_total``,
``jobs_succeeded_total``, ``jobs_failed_total`` (failed attempts),
``jobs_permanently_failed_total`` (each by ``task``); histograms
``job_duration_seconds`` and ``job_pickup_latency_seconds`` (``run_at`` to
start; not for a ``run_at`` of ``-infinity``), by ``task``; gauges
``executors``, ``executors_busy``,
``local_queue_jobs``, ``local_queue_size``, ``stuck_threads`` (by ``pool``); ``jobs`` (by
``task`` and ``state``), ``jobs_other_tasks``, ``locked_queues``,
``live_pools`` and ``database_up`` sampled from the database;
``cron_firings_total``,
``cron_skips_total`` (due firings another instance had already scheduled),
``cron_backfilled_total`` and ``cron_lag_seconds`` (how far behind the minute
the latest firing was written).

The database may hold jobs of any number of task identifiers (other
applications enqueue there too), so ``jobs`` has series of its own for the
``depth_max_tasks`` tasks with the most jobs only (:data:`DEPTH_MAX_TASKS`,
100, by default); the jobs of every other task are added up under
``task="_other"``, and ``jobs_other_tasks`` says how many tasks that is.
The job counters and histograms need no cap: a worker only runs the tasks it
has handlers for.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

try:
    from prometheus_client import CollectorRegistry, Counter, Histogram
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    from kongtask.errors import ConfigurationError

    raise ConfigurationError(
        "kongtask.ops.metrics needs prometheus_client: pip install 'kongtask[metrics]'",
        name="metrics",
    ) from exc

from kongtask import events
from kongtask.db.statements import Queries
from kongtask.db.timestamps import OutOfRangeTimestamp
from kongtask.jobs.limits import LimitInfo, PauseInfo
from kongtask.ops import limits as fleet
from kongtask.ops.status import JOB_STATES, LIVE_POOL_BOUND_S
from kongtask.ops.view import RunnerView
from kongtask.settings import DEFAULT_SCHEMA
from kongtask.validate import check_int

__all__ = ["DEPTH_MAX_AGE_S", "DEPTH_MAX_TASKS", "OTHER_TASKS", "Metrics", "register"]

logger = logging.getLogger(__name__)

#: Queue depth is sampled from the database at most this often (seconds).
DEPTH_MAX_AGE_S = 5.0

#: Seconds a depth sample may take before the scrape reports the database down.
DEPTH_TIMEOUT_S = 3.0

#: Tasks (those with the most jobs) that get ``kongtask_jobs`` series of their own.
DEPTH_MAX_TASKS = 100

#: The ``task`` label under which the jobs of every other task are added up.
OTHER_TASKS = "_other"

ConnectionFactory = Callable[[], AbstractContextManager[Any]]

# Start times kept for the duration histogram; more than this means leaks.
_MAX_TRACKED_STARTS = 100_000


@dataclass(frozen=True, slots=True)
class _TaskMetrics:
    """One task's labelled children of the job metrics."""

    started: Any
    succeeded: Any
    failed: Any
    duration: Any
    pickup: Any


class _LoadCollector(Collector):
    """Gauges read from each attached Runner's :meth:`~kongtask.runner.Runner.load`."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = {
            "concurrency": GaugeMetricFamily(
                "kongtask_executors", "Executor threads of the pool", labels=["pool"]
            ),
            "executors_busy": GaugeMetricFamily(
                "kongtask_executors_busy", "Executors running a job right now", labels=["pool"]
            ),
            "local_queue_jobs": GaugeMetricFamily(
                "kongtask_local_queue_jobs",
                "Claimed jobs waiting in the local queue for an executor",
                labels=["pool"],
            ),
            "local_queue_size": GaugeMetricFamily(
                "kongtask_local_queue_size", "Capacity of the local queue", labels=["pool"]
            ),
            "stuck_threads": GaugeMetricFamily(
                "kongtask_stuck_threads",
                "Executor threads still in a handler that ran past its timeout",
                labels=["pool"],
            ),
        }
        for runner in self._metrics.runners():
            load = runner.load()
            if load is None or runner.pool_id is None:
                continue
            for name, family in families.items():
                family.add_metric([runner.pool_id], getattr(load, name))
        yield from families.values()


class _DepthCollector(Collector):
    """Queue depth by task and state, sampled from the database (cached briefly)."""

    def __init__(
        self, connect: ConnectionFactory, queries: Queries, max_age_s: float, max_tasks: int
    ) -> None:
        self._connect = connect
        self._queries = queries
        self._max_age_s = max_age_s
        self._max_tasks = max_tasks
        self._lock = threading.Lock()
        self._sampled_at = -float("inf")
        self._sample: dict[str, Any] | None = None

    def sample(self) -> dict[str, Any] | None:
        """The latest sample (taking a new one if the last is too old); ``None`` if it failed."""
        with self._lock:
            if time.monotonic() - self._sampled_at < self._max_age_s:
                return self._sample
            self._sample = _run_with_deadline(self._query, DEPTH_TIMEOUT_S)
            self._sampled_at = time.monotonic()
            return self._sample

    def _query(self) -> dict[str, Any]:
        with self._connect() as conn:
            counts: dict[tuple[str, str], int] = {}
            for row in conn.execute(self._queries.status_counts).fetchall():
                task, _queue, state, _locked_by, jobs = row
                counts[(task, state)] = counts.get((task, state), 0) + jobs
            locked = len(conn.execute(self._queries.locked_queues).fetchall())
            pools = conn.execute(self._queries.pools, {"live_bound_s": LIVE_POOL_BOUND_S})
            live = sum(1 for row in pools.fetchall() if row[-1])
            limits = fleet.list_limits(conn, self._queries)
            pauses = fleet.list_pauses(conn, self._queries)
        return {
            **self._fold(counts),
            "locked": locked,
            "live": live,
            "limits": limits,
            "pauses": pauses,
        }

    def _fold(self, counts: dict[tuple[str, str], int]) -> dict[str, Any]:
        """Counts by state for the ``max_tasks`` tasks with the most jobs, and for the rest.

        Ties go by name, so the tasks shown stay the same while the numbers do.
        A task literally named ``_other`` is always among the rest.
        """
        by_task: dict[str, dict[str, int]] = {}
        for (task, state), jobs in counts.items():
            states = by_task.setdefault(task, {})
            states[state] = states.get(state, 0) + jobs
        ranked = sorted(
            (task for task in by_task if task != OTHER_TASKS),
            key=lambda task: (-sum(by_task[task].values()), task),
        )
        shown = sorted(ranked[: self._max_tasks])
        folded = ranked[self._max_tasks :] + ([OTHER_TASKS] if OTHER_TASKS in by_task else [])
        other: dict[str, int] = {}
        for task in folded:
            for state, jobs in by_task[task].items():
                other[state] = other.get(state, 0) + jobs
        return {
            "tasks": {task: by_task[task] for task in shown},
            "other": other if folded else None,
            "other_tasks": len(folded),
        }

    def collect(self) -> Iterator[GaugeMetricFamily]:
        sample = self.sample()
        up = GaugeMetricFamily("kongtask_database_up", "1 if the last depth sample succeeded")
        up.add_metric([], 1 if sample is not None else 0)
        yield up
        if sample is None:
            return
        jobs = GaugeMetricFamily(
            "kongtask_jobs",
            f"Jobs in the database by task and state (the {self._max_tasks} tasks with the "
            f'most jobs; the others added up as task="{OTHER_TASKS}")',
            labels=["task", "state"],
        )
        series = dict(sample["tasks"])
        if sample["other"] is not None:
            series[OTHER_TASKS] = sample["other"]
        for task, states in series.items():
            for state in JOB_STATES:
                jobs.add_metric([task, state], states.get(state, 0))
        yield jobs
        other = GaugeMetricFamily(
            "kongtask_jobs_other_tasks",
            f'Task identifiers whose jobs are added up as task="{OTHER_TASKS}"',
        )
        other.add_metric([], sample["other_tasks"])
        yield other
        locked = GaugeMetricFamily("kongtask_locked_queues", "Named queues locked by a pool")
        locked.add_metric([], sample["locked"])
        yield locked
        live = GaugeMetricFamily("kongtask_live_pools", "kongtask pools whose heartbeat is recent")
        live.add_metric([], sample["live"])
        yield live
        yield from _limit_families(sample["limits"], sample["pauses"])


def _limit_families(
    limits: list[LimitInfo], pauses: list[PauseInfo]
) -> Iterator[GaugeMetricFamily]:
    """The fleet-wide limits (their caps and what runs now) and the pauses."""
    labels = ["key_kind", "key"]
    concurrency = GaugeMetricFamily(
        "kongtask_limit_concurrency", "Fleet-wide concurrency limit per key", labels=labels
    )
    rate = GaugeMetricFamily(
        "kongtask_limit_rate_per_second", "Fleet-wide rate limit per key (starts/s)", labels=labels
    )
    running = GaugeMetricFamily(
        "kongtask_limit_running", "Jobs of a limited key locked now", labels=labels
    )
    for limit in limits:
        key = [limit.key_kind, limit.key]
        if limit.concurrency is not None:
            concurrency.add_metric(key, limit.concurrency)
        if limit.rate is not None:
            rate.add_metric(key, limit.rate.count / limit.rate.interval_s)
        running.add_metric(key, limit.running)
    paused = GaugeMetricFamily(
        "kongtask_paused", "1 for each paused task or queue", labels=["kind", "key"]
    )
    for pause in pauses:
        paused.add_metric([pause.key_kind, pause.key], 1)
    yield from (concurrency, rate, running, paused)


def _run_with_deadline(action: Callable[[], Any], timeout_s: float) -> Any:
    """``action()`` on a helper thread; ``None`` if it fails or is not done in time.

    A database that stopped answering (a cut network) must not hang a scrape.
    """
    result: list[Any] = []

    def target() -> None:
        try:
            result.append(action())
        except Exception as exc:
            logger.warning("Sampling the queue failed: %s", exc)

    thread = threading.Thread(target=target, name="kongtask-metrics-sample", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return result[0] if result else None


class Metrics:
    """kongtask's metrics in one registry; :meth:`attach` a Runner to count its work."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        connect: ConnectionFactory | None = None,
        schema: str = DEFAULT_SCHEMA,
        depth_max_age_s: float = DEPTH_MAX_AGE_S,
        depth_max_tasks: int = DEPTH_MAX_TASKS,
    ) -> None:
        check_int("depth_max_tasks", depth_max_tasks, 1, 10_000)
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        self.jobs_started = Counter(
            "kongtask_jobs_started", "Jobs whose handler started", ["task"], registry=reg
        )
        self.jobs_succeeded = Counter(
            "kongtask_jobs_succeeded", "Jobs whose handler returned", ["task"], registry=reg
        )
        self.jobs_failed = Counter(
            "kongtask_jobs_failed", "Failed attempts (retried or not)", ["task"], registry=reg
        )
        self.jobs_permanently_failed = Counter(
            "kongtask_jobs_permanently_failed",
            "Jobs that failed their last attempt",
            ["task"],
            registry=reg,
        )
        self.job_duration = Histogram(
            "kongtask_job_duration_seconds", "Handler run time", ["task"], registry=reg
        )
        self.pickup_latency = Histogram(
            "kongtask_job_pickup_latency_seconds",
            "From a job's run_at to its handler starting",
            ["task"],
            registry=reg,
        )
        self.cron_firings = Counter(
            "kongtask_cron_firings", "Cron firings this instance scheduled", registry=reg
        )
        self.cron_skips = Counter(
            "kongtask_cron_skips",
            "Due cron firings another instance had already scheduled",
            registry=reg,
        )
        self.cron_backfilled = Counter(
            "kongtask_cron_backfilled", "Missed cron firings scheduled by backfill", registry=reg
        )
        self._cron_lag = Histogram(
            "kongtask_cron_lag_seconds",
            "How far behind its minute a cron firing was written",
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, float("inf")),
            registry=reg,
        )
        self._runners: list[RunnerView] = []
        self._receivers: list[tuple[Any, Callable[..., None]]] = []
        self._started: dict[tuple[str, int], float] = {}
        self._by_task: dict[str, _TaskMetrics] = {}
        self._lock = threading.Lock()
        #: Per Runner (by id): the latest cron lag seen (seconds) and when
        #: (``time.monotonic()``), for the readiness probe.
        self.cron_lag_s: dict[int, tuple[float, float]] = {}
        reg.register(_LoadCollector(self))
        if connect is not None:
            reg.register(
                _DepthCollector(connect, Queries(schema), depth_max_age_s, depth_max_tasks)
            )

    def runners(self) -> list[Any]:
        """The Runners attached."""
        with self._lock:
            return list(self._runners)

    def attach(self, runner: RunnerView) -> None:
        """Count ``runner``'s jobs and cron firings (call before it starts to miss nothing)."""
        with self._lock:
            self._runners.append(runner)
        # Two events per job (start, complete) and one per permanent failure:
        # job:success and job:error stay without receivers, so the Runner drops
        # them at the source (the outcome is in job:complete's ``error``).
        handlers: dict[str, Callable[..., None]] = {
            "job:start": self._on_start,
            "job:complete": self._on_complete,
            "job:failed": lambda sender, *, job, **_: self.jobs_permanently_failed.labels(
                job.task_identifier
            ).inc(),
            "cron:scheduled": self._on_cron_scheduled,
            "cron:overdueTimer": self._on_cron_overdue,
            "cron:backfill": lambda sender, *, items_to_backfill, **_: self.cron_backfilled.inc(
                len(items_to_backfill)
            ),
        }
        for name, handler in handlers.items():
            signal = events.signal_for(name)
            signal.connect(handler, sender=runner, weak=False)
            self._receivers.append((signal, handler))

    def detach(self) -> None:
        """Stop counting (disconnect every receiver) and forget the Runners."""
        for signal, handler in self._receivers:
            signal.disconnect(handler)
        self._receivers.clear()
        with self._lock:
            self._runners.clear()

    # --- receivers (run on each Runner's event publisher thread) --------------------

    def _children(self, task: str) -> _TaskMetrics:
        """The labelled metrics of one task (looked up once, not per job)."""
        children = self._by_task.get(task)
        if children is None:
            children = self._by_task[task] = _TaskMetrics(
                started=self.jobs_started.labels(task),
                succeeded=self.jobs_succeeded.labels(task),
                failed=self.jobs_failed.labels(task),
                duration=self.job_duration.labels(task),
                pickup=self.pickup_latency.labels(task),
            )
        return children

    def _on_start(self, sender: Any, *, worker_id: str, job: Any, **_: Any) -> None:
        children = self._children(job.task_identifier)
        children.started.inc()
        if not isinstance(job.run_at, OutOfRangeTimestamp):
            # ('-infinity', "as soon as possible", would add millennia to the sum.)
            latency = (_now(sender) - job.run_at).total_seconds()
            children.pickup.observe(latency if latency > 0 else 0.0)
        if len(self._started) > _MAX_TRACKED_STARTS:
            self._started.clear()  # jobs abandoned at a shutdown never complete
        self._started[(worker_id, job.id)] = time.perf_counter()

    def _on_complete(
        self, sender: Any, *, worker_id: str, job: Any, error: Any = None, **payload: Any
    ) -> None:
        children = self._children(job.task_identifier)
        (children.succeeded if error is None else children.failed).inc()
        started = self._started.pop((worker_id, job.id), None)
        duration = payload.get("duration_s")
        if duration is None and started is not None:
            # Events arrive in order on one thread, so start-to-complete delivery
            # times measure the handler (plus a delivery jitter).
            duration = time.perf_counter() - started
        if duration is not None:
            children.duration.observe(duration)

    def _on_cron_scheduled(
        self,
        sender: Any,
        *,
        timestamp: int,
        jobs_and_identifiers: list[Any],
        scheduled_identifiers: list[str],
        **_: Any,
    ) -> None:
        self.cron_firings.inc(len(scheduled_identifiers))
        self.cron_skips.inc(len(jobs_and_identifiers) - len(scheduled_identifiers))
        lag = max(0.0, _now(sender).timestamp() - timestamp / 1000)
        self._cron_lag.observe(lag)
        self.cron_lag_s[id(sender)] = (lag, time.monotonic())

    def _on_cron_overdue(
        self, sender: Any, *, current_timestamp: int, expected_timestamp: int, **_: Any
    ) -> None:
        lag = max(0.0, (current_timestamp - expected_timestamp) / 1000)
        self.cron_lag_s[id(sender)] = (lag, time.monotonic())


def _now(runner: RunnerView) -> datetime:
    """The Runner's clock (a test's ManualClock)."""
    return runner.now()


def register(
    registry: CollectorRegistry,
    *,
    runner: RunnerView | None = None,
    connect: ConnectionFactory | None = None,
    schema: str | None = None,
    depth_max_tasks: int = DEPTH_MAX_TASKS,
) -> Metrics:
    """Add kongtask's metrics to ``registry`` and count ``runner``'s work.

    Queue depth is sampled through ``connect`` (a callable returning a
    connection context manager), else through ``runner``'s own pool, with
    series for the ``depth_max_tasks`` tasks with the most jobs.
    """
    if connect is None and runner is not None:

        def connect() -> AbstractContextManager[Any]:
            manager: AbstractContextManager[Any] = runner.connection(timeout_s=DEPTH_TIMEOUT_S)
            return manager

    if schema is None:
        schema = runner.settings.schema if runner is not None else DEFAULT_SCHEMA
    metrics = Metrics(registry, connect=connect, schema=schema, depth_max_tasks=depth_max_tasks)
    if runner is not None:
        metrics.attach(runner)
    return metrics
