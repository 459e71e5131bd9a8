"""The claimer: claims batches of runnable jobs into the local queue.

One claim statement (``Queries.get_jobs``) locks up to the free room in the
local queue for this pool, in priority then run_at order, at most one job per
named queue. When to claim again follows what the last claim said
(:class:`~kongtask.actors.local_queue.FetchMode`): a full batch means more is
waiting (claim again at the low-water mark), a short one means claim again
when the buffer is empty, none means wait for ``jobs:insert``, the poll
fallback, or a queue being released. Buffered jobs left unstarted for
``local_queue_ttl_s`` are given back, as graphile-worker's local queue does.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from kongtask import events
from kongtask.job import Job
from kongtask.protocols import TimerHandle

from .context import WorkerContext
from .db_actor import DbActor
from .local_queue import FetchMode

__all__ = ["Claimer"]

logger = logging.getLogger(__name__)

FETCH = "fetch"
NUDGE = "nudge"
POLL = "poll"
TTL = "ttl"
SHUTDOWN = "shutdown"


class Claimer(DbActor):
    """Owns the claim connection; messages: fetch, nudge, poll, ttl, shutdown."""

    action = "getJob"

    def __init__(self, ctx: WorkerContext) -> None:
        super().__init__(ctx)
        self._stopping = False
        self._poll_timer: TimerHandle | None = None
        self._ttl_timer: TimerHandle | None = None
        self._last_fill_at = 0.0
        self._task_id_list: list[int] = []
        # What the last claim saw, for telling whether a refetch can find anything new.
        self._inserts_at_claim = -1
        self._finished_at_claim = 0
        self._last_batch_queued = False
        # The newest locked_at among the jobs claims have answered with: any
        # job locked by this pool later than that comes from a lost answer.
        self._last_locked_at = datetime.min.replace(tzinfo=UTC)
        settings = ctx.settings
        self._flags = (
            list(settings.forbidden_flags) if settings.forbidden_flags is not None else None
        )

    def handle(self, message: Any) -> Any:
        if message == FETCH:
            self.ctx.queue.fetch_requested = False
            if not self._nothing_new():
                self._maybe_claim(force=False)
        elif message == NUDGE:
            self._maybe_claim(force=True)
        elif message == POLL:
            self._poll_timer = None
            if self.ctx.queue.mode == FetchMode.EMPTY:
                self._maybe_claim(force=True)
        elif message == TTL:
            self._expire()
        elif message == SHUTDOWN:
            return self._shutdown()
        return None

    # --- claiming ---------------------------------------------------------------

    def _register_tasks(self) -> None:
        identifiers = sorted(self.ctx.tasks)

        def upsert(conn: psycopg.Connection[Any]) -> list[tuple[int, str]]:
            return conn.execute(
                self.ctx.queries.upsert_task_ids, {"identifiers": identifiers}
            ).fetchall()

        rows = self.run(upsert, "Registering task identifiers")
        self.ctx.task_ids.update(dict(rows))
        self._task_id_list = sorted(self.ctx.task_ids)
        if not self._task_id_list:
            logger.warning("No tasks found; nothing to do!")

    def _nothing_new(self) -> bool:
        """True when a refetch after a short batch cannot find anything new.

        A claim that got fewer jobs than it asked for took everything runnable
        then. Until ``jobs:insert`` says otherwise, or a finished job releases a
        named queue the claim had to skip, another claim would come back empty;
        skipping it spares a round trip that would compete with the next real
        claim. The buffer then waits as after an empty claim (notification,
        poll, or the completer's nudge on a queue release).
        """
        ctx = self.ctx
        queue = ctx.queue
        if (
            ctx.settings.once
            or queue.mode != FetchMode.PARTIAL
            or len(queue)
            or queue.wants_idle_claim
            or queue.inserts_notified != self._inserts_at_claim
        ):
            return False
        if self._last_batch_queued and queue.finished_total != self._finished_at_claim:
            return False
        queue.mode = FetchMode.EMPTY
        self._schedule_poll()
        return True

    def _maybe_claim(self, *, force: bool) -> None:
        ctx = self.ctx
        queue = ctx.queue
        if self._stopping or ctx.stopping:
            return
        buffered = len(queue)
        want = queue.size - buffered
        if want <= 0:
            return
        if not force:
            if queue.mode == FetchMode.FULL and buffered > queue.low_water:
                return
            if queue.mode != FetchMode.FULL and buffered > 0:
                return
        if not self._task_id_list:
            self._register_tasks()
        mark = queue.join_requests
        held_at_start = queue.in_flight
        finished_at_start = queue.finished_total
        self._inserts_at_claim = queue.inserts_notified
        self._finished_at_claim = finished_at_start
        ctx.bus.emit(events.worker_get_job_start, pool_id=ctx.pool_id)
        try:
            jobs = self.run(lambda conn: self._claim(conn, want), "Claiming jobs")
            if self.retried:
                jobs += self.run(lambda conn: self._orphans(conn, jobs), "Adopting claimed jobs")
            self._note_answered(jobs)
        except Exception as exc:
            if not isinstance(exc, psycopg.Error):
                raise
            logger.error("Failed to get jobs: %s", exc)
            ctx.bus.emit(events.worker_get_job_error, pool_id=ctx.pool_id, error=exc)
            queue.mode = FetchMode.EMPTY
            self._schedule_poll()
            return
        self._last_batch_queued = any(job.job_queue_id is not None for job in jobs)
        if jobs:
            queue.put_many(jobs)
            ctx.bus.emit(events.local_queue_get_jobs_complete, pool_id=ctx.pool_id, jobs=jobs)
            self._arm_ttl()
        if len(jobs) == want:
            queue.mode = FetchMode.FULL
            if len(queue) <= queue.low_water:
                self.actor_ref.tell(FETCH)
        elif jobs:
            queue.mode = FetchMode.PARTIAL
            if not len(queue):
                self.actor_ref.tell(FETCH)
        else:
            queue.mode = FetchMode.EMPTY
            ctx.bus.emit(events.worker_get_job_empty, pool_id=ctx.pool_id)
            if queue.finished_total != finished_at_start:
                # Jobs finished while we claimed (their queue locks may have been
                # skipped as locked): look again rather than wait for a poll.
                self.actor_ref.tell(NUDGE)
                return
            if held_at_start <= 0 and queue.in_flight <= 0:
                logger.debug(
                    "Nothing runnable and nothing held (in_flight %d, buffered %d)",
                    queue.in_flight,
                    len(queue),
                )
                queue.mark_idle(mark)
                if ctx.settings.once:
                    ctx.request_shutdown(
                        "'Run once' mode processed all available jobs and is now exiting"
                    )
                    return
            if not ctx.settings.once:
                self._schedule_poll()

    def _claim(self, conn: psycopg.Connection[Any], want: int) -> list[Job]:
        ctx = self.ctx
        params = {
            "task_ids": self._task_id_list,
            "forbidden_flags": self._flags,
            "batch": want,
            "pool_id": ctx.pool_id,
        }
        with conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(ctx.queries.get_jobs, params).fetchall()
        return self._jobs_of(rows)

    def _orphans(self, conn: psycopg.Connection[Any], claimed: list[Job]) -> list[Job]:
        """Jobs locked by a claim whose answer was lost with its connection."""
        params = {
            "pool_id": self.ctx.pool_id,
            "since": self._last_locked_at,
            "claimed": [job.id for job in claimed],
        }
        with conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(self.ctx.queries.orphaned_claims, params).fetchall()
        if rows:
            logger.warning(
                "Adopted %d job(s) locked by a claim whose answer was lost: %s",
                len(rows),
                ", ".join(str(row["id"]) for row in rows),
            )
        return self._jobs_of(rows)

    def _jobs_of(self, rows: list[dict[str, Any]]) -> list[Job]:
        task_ids = self.ctx.task_ids
        return [Job.from_row(row, task_ids[row["task_id"]]) for row in rows]

    def _note_answered(self, jobs: list[Job]) -> None:
        """Remember the newest lock among jobs whose claim answered (see _orphans)."""
        for job in jobs:
            if job.locked_at is not None and job.locked_at > self._last_locked_at:
                self._last_locked_at = job.locked_at

    def _schedule_poll(self) -> None:
        if self._poll_timer is None and not self._stopping:
            ref = self.actor_ref
            self._poll_timer = self.ctx.clock.call_later(
                self.ctx.settings.poll_interval_s, lambda: ref.tell(POLL)
            )

    # --- the local queue's TTL ------------------------------------------------------

    def _arm_ttl(self) -> None:
        self._last_fill_at = self.ctx.clock.monotonic()
        if self._ttl_timer is None:
            self._start_ttl_timer(self.ctx.settings.local_queue_ttl_s)

    def _start_ttl_timer(self, delay_s: float) -> None:
        ref = self.actor_ref
        self._ttl_timer = self.ctx.clock.call_later(delay_s, lambda: ref.tell(TTL))

    def _expire(self) -> None:
        self._ttl_timer = None
        if self._stopping:
            return
        ttl = self.ctx.settings.local_queue_ttl_s
        age = self.ctx.clock.monotonic() - self._last_fill_at
        if age < ttl:
            self._start_ttl_timer(ttl - age)
            return
        jobs = self.ctx.queue.drain()
        if jobs:
            logger.debug("Returning %d unstarted jobs after the local queue TTL", len(jobs))
            self.ctx.queue.mode = FetchMode.PARTIAL
            self._return(jobs)

    # --- giving jobs back -----------------------------------------------------------

    def _return(self, jobs: list[Job]) -> None:
        ctx = self.ctx
        ids = [job.id for job in jobs]

        def give_back(conn: psycopg.Connection[Any]) -> None:
            conn.execute(ctx.queries.return_jobs, {"ids": ids, "pool_id": ctx.pool_id})

        self.run(give_back, "Returning jobs")
        ctx.queue.finished(len(jobs))
        ctx.bus.emit(events.local_queue_return_jobs, pool_id=ctx.pool_id, jobs=jobs)

    def _shutdown(self) -> list[Job]:
        """Stop claiming for good and give back every buffered job; returns them."""
        self._stopping = True
        for timer in (self._poll_timer, self._ttl_timer):
            if timer is not None:
                timer.cancel()
        self._poll_timer = self._ttl_timer = None
        jobs = self.ctx.queue.drain()
        if jobs:
            self._return(jobs)
        return jobs
