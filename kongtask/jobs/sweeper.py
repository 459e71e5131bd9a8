"""The stale-lock sweep: frees jobs and queues locked by workers that died.

A lock older than ``lock_expiry`` (4 hours, as graphile-worker) cannot belong
to a live worker. The first sweep runs after a random part of a minute, then
every 8 to 10 minutes with jitter, all timed by the Runner's clock so tests can
drive it with a ``ManualClock``. Run-once mode does not sweep.

The same sweep frees what kongtask pools without a liveness record still hold
(locks older than ``pool_dead_after_s``: a pool that died and whose release
was missed, or that stopped without giving everything back) and forgets the
crash counts of jobs that are gone. Dead pools *with* a record are released
much sooner, by :mod:`kongtask.jobs.liveness`.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from typing import Any

import psycopg

from kongtask import events
from kongtask.jobs.context import WorkerContext
from kongtask.jobs.db_actor import DbActor
from kongtask.protocols import TimerHandle
from kongtask.runtime.message import Fieldless

__all__ = ["StopTimers", "Sweep", "Sweeper", "SweeperMessage"]

logger = logging.getLogger(__name__)

# Our own generator: kongtask never moves the application's global random state.
_JITTER = random.Random()


class Sweep(Fieldless):
    """The sweep timer fired: sweep now, then schedule the next sweep."""

    __slots__ = ()


class StopTimers(Fieldless):
    """The pool is stopping: cancel the next sweep and schedule no more."""

    __slots__ = ()


SweeperMessage = Sweep | StopTimers


class Sweeper(DbActor):
    """Runs the sweep on :class:`Sweep` messages and schedules the next one."""

    action = "resetLocked"
    max_attempts = 10

    def __init__(self, ctx: WorkerContext, nudge: Callable[[], None]) -> None:
        super().__init__(ctx)
        self._nudge = nudge
        self._timer: TimerHandle | None = None

    def on_start(self) -> None:
        settings = self.ctx.settings
        first = _JITTER.random() * min(60.0, settings.max_reset_locked_interval_s)
        self._schedule(first)

    def handle(self, message: SweeperMessage) -> Any:
        match message:
            case Sweep():
                self._timer = None
                if not self.ctx.stopping:
                    self._sweep()
            case StopTimers():
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
        return None

    def _schedule(self, delay_s: float) -> None:
        ref = self.actor_ref
        self._timer = self.ctx.clock.call_later(delay_s, lambda: ref.tell(Sweep()))

    def _next_delay_s(self) -> float:
        settings = self.ctx.settings
        low, high = settings.min_reset_locked_interval_s, settings.max_reset_locked_interval_s
        return math.ceil((low + _JITTER.random() * (high - low)) * 1000) / 1000

    def _sweep(self) -> None:
        ctx = self.ctx
        ctx.bus.emit(events.reset_locked_started, pool_id=ctx.pool_id)
        delay = self._next_delay_s()

        def reset(conn: psycopg.Connection[Any]) -> None:
            conn.execute(ctx.queries.reset_locked, {"expiry": ctx.settings.lock_expiry})
            bound = {"dead_after_s": ctx.settings.pool_dead_after_s}
            orphans = [row[0] for row in conn.execute(ctx.queries.orphaned_pool_locks, bound)]
            if orphans:
                logger.warning(
                    "Releasing locks held by kongtask pool(s) with no liveness record: %s",
                    ", ".join(orphans),
                )
                conn.execute(ctx.queries.force_unlock_workers, {"worker_ids": orphans})
            conn.execute(ctx.queries.gc_job_crashes)

        try:
            self.run(reset, "Resetting stale locks")
        except psycopg.Error as exc:
            logger.error("Failed to reset locked; we'll try again in %.0fms: %s", delay * 1000, exc)
            ctx.bus.emit(events.reset_locked_failure, pool_id=ctx.pool_id, error=exc, delay_s=delay)
        else:
            ctx.bus.emit(events.reset_locked_success, pool_id=ctx.pool_id, delay_s=delay)
            # Freed jobs may be runnable right away.
            self._nudge()
        finally:
            # The sweep borrows a connection only while it runs.
            self._drop_connection(broken=False)
        if not self.ctx.stopping:
            self._schedule(delay)
