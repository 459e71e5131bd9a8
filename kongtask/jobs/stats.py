"""Per-task outcome counts a pool gathers between heartbeats (the dashboard's chart).

Completed jobs are deleted from the queue, so nothing in graphile-worker's
tables says how many finished; each kongtask pool counts its own outcomes by
task here (the completer adds each written batch) and its heartbeat adds them
to ``_kongtask_task_stats`` under the heartbeat's minute, pruning rows older
than :data:`STATS_KEPT`. Pickup latency is how long a job waited past its
``run_at`` until a pool claimed it (``locked_at - run_at``), both by the
database's clock.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from kongtask.job import Job
from kongtask.jobs.outbox import Outcomes

__all__ = ["STATS_KEPT", "TaskCounts", "TaskStats", "stats_params"]

#: How long the per-minute rows are kept (a PostgreSQL interval).
STATS_KEPT = "24 hours"


@dataclass
class TaskCounts:
    """One task's outcomes since the last write."""

    finished: int = 0
    failed: int = 0
    latency_sum_s: float = 0.0
    latency_count: int = 0
    latency_max_s: float | None = None

    def add_latency(self, seconds: float) -> None:
        self.latency_sum_s += seconds
        self.latency_count += 1
        self.latency_max_s = max(seconds, self.latency_max_s or 0.0)

    def merge(self, other: TaskCounts) -> None:
        self.finished += other.finished
        self.failed += other.failed
        self.latency_sum_s += other.latency_sum_s
        self.latency_count += other.latency_count
        if other.latency_max_s is not None:
            self.latency_max_s = max(other.latency_max_s, self.latency_max_s or 0.0)


class TaskStats:
    """Thread-safe counts by task: the completer adds, the heartbeat takes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, TaskCounts] = {}

    def record(self, outcomes: Outcomes) -> None:
        """Count a batch the completer wrote: successes finished, failures failed."""
        with self._lock:
            for job in outcomes.successes:
                self._entry(job).finished += 1
            for job, *_ in outcomes.failures:
                self._entry(job).failed += 1

    def _entry(self, job: Job) -> TaskCounts:
        counts = self._counts.get(job.task_identifier)
        if counts is None:
            counts = self._counts[job.task_identifier] = TaskCounts()
        if job.locked_at is not None:
            counts.add_latency(max(0.0, (job.locked_at - job.run_at).total_seconds()))
        return counts

    def take(self) -> dict[str, TaskCounts]:
        """Everything counted since the last take (the counts start again from zero)."""
        with self._lock:
            taken, self._counts = self._counts, {}
        return taken

    def give_back(self, taken: dict[str, TaskCounts]) -> None:
        """Put back counts whose write failed, so the next heartbeat writes them."""
        with self._lock:
            for task, counts in taken.items():
                entry = self._counts.setdefault(task, TaskCounts())
                entry.merge(counts)


def stats_params(pool_id: str, taken: dict[str, TaskCounts]) -> dict[str, Any]:
    """The record_task_stats statement's parameters for ``taken`` (one array per column)."""
    tasks = sorted(taken)
    return {
        "pool_id": pool_id,
        "kept": STATS_KEPT,
        "tasks": tasks,
        "finished": [taken[t].finished for t in tasks],
        "failed": [taken[t].failed for t in tasks],
        "latency_sum_s": [taken[t].latency_sum_s for t in tasks],
        "latency_count": [taken[t].latency_count for t in tasks],
        "latency_max_s": [taken[t].latency_max_s for t in tasks],
    }
