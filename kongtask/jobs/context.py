"""The state one Runner's actors share: settings, the pool, the queue, the bus.

It is built by the Runner at start and handed to each actor; it holds no job
logic. Keeping it in one object (rather than module globals) is what lets
several Runners live in one process without touching each other.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from psycopg_pool import ConnectionPool

from kongtask.db.statements import Queries
from kongtask.jobs.limits import LimitSet
from kongtask.jobs.local_queue import LocalQueue
from kongtask.jobs.outbox import OutcomeObserver
from kongtask.jobs.ownership import Ownership
from kongtask.jobs.stats import TaskStats
from kongtask.protocols import Clock
from kongtask.runtime.host import RunStatus
from kongtask.runtime.publisher import EventBus
from kongtask.settings import WorkerSettings

__all__ = ["WorkerContext", "new_pool_id", "new_worker_id"]

logger = logging.getLogger(__name__)


def new_pool_id(once: bool = False) -> str:
    """A fresh pool id: ``pool-`` (or ``otpool-`` for run-once) and 18 hex digits."""
    return ("otpool-" if once else "pool-") + secrets.token_hex(9)


def new_worker_id() -> str:
    """A fresh worker id: ``worker-`` and 18 hex digits."""
    return "worker-" + secrets.token_hex(9)


@dataclass(eq=False)
class WorkerContext:
    """Everything a Runner's actors share (one per Runner)."""

    settings: WorkerSettings
    queries: Queries
    pool_id: str
    conninfo: str
    pool: ConnectionPool[Any]
    tasks: Mapping[str, Callable[..., Any]]
    clock: Clock
    bus: EventBus
    queue: LocalQueue
    #: Reports a failure nothing can recover from; the Runner shuts down loudly.
    fatal: Callable[[str, BaseException], None]
    #: Asks the Runner to begin a graceful shutdown with a message.
    request_shutdown: Callable[[str], None]
    #: The run state, owned by the host: read here, never written.
    run: RunStatus
    no_log_success: bool = False
    task_ids: dict[int, str] = field(default_factory=dict)
    queue_names: dict[int, str] = field(default_factory=dict)
    #: Shown each batch of outcomes the completer wrote (kongtask's cron history), if set.
    outcome_observer: OutcomeObserver | None = None
    #: The fleet's limited and paused keys as the claimer last read them (it alone writes).
    limits: LimitSet = field(default_factory=LimitSet)
    #: Whether buffered jobs may have been taken from this pool (heartbeats feed it).
    ownership: Ownership = field(init=False)
    #: Outcome counts by task, written with the heartbeat (the dashboard's chart).
    stats: TaskStats = field(default_factory=TaskStats)

    def __post_init__(self) -> None:
        settings = self.settings
        self.ownership = Ownership(settings.heartbeat_interval_s, settings.pool_dead_after_s)

    @property
    def stopping(self) -> bool:
        """True once the run has begun to end (the host's run state says so)."""
        return self.run.ending

    @property
    def give_up(self) -> threading.Event:
        """Set once the run aborts: database retries stop waiting and give up."""
        return self.run.aborting
