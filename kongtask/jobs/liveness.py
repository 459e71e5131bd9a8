"""Pool liveness: this pool's heartbeat, and the release of pools that died without a word.

Every kongtask pool has a row in ``_kongtask_pools``, inserted before it
claims anything and deleted on a clean stop. Every ``heartbeat_interval_s``
the pool moves its ``last_seen`` to the database's ``now()`` (never the local
clock, so a skewed host cannot fake a death) and then releases every pool
whose heartbeat is older than ``pool_dead_after_s``: their jobs and named
queues go back to the queue, a job that was running there as a crash suspect
is counted as having crashed it, and one that crashed ``crash_quarantine_after``
workers is failed for good (:mod:`kongtask.jobs.quarantine`). A pool that
was SIGKILLed is so released within ``pool_dead_after_s`` plus one interval.
Node pools keep no row and are left to the 4-hour stale-lock sweep.

Faster: before registering, the pool takes a session-level advisory lock,
keyed from its pool id, on a direct connection of its own (the LISTEN
connection string when there is one, since pgbouncer's transaction pooling
cannot keep a session lock). The key is stored in the pool's row. When the
process dies, PostgreSQL ends the session and drops the lock; every
``dead_pool_check_interval_s`` the other pools run the same release, which
also takes any pool whose lock nobody holds. A SIGKILLed pool is then
released within about one check interval; the heartbeat bound still covers
what the lock cannot see (a frozen host, a network partition). A pool whose
lock session breaks (a restart of the server, a terminated session) takes
the lock again at its next check; the record says since when it holds it,
and locks taken before the server last started are not judged, so a restart
does not make every pool look dead. A session terminated on purpose does
look like a death to the other pools for up to one check interval.

The heartbeat runs on real time even when the Runner has a ``ManualClock``:
the database's clock, which judges it, does not stop for a test.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

import psycopg

from kongtask._version import __version__
from kongtask.db.connecting import connect
from kongtask.jobs.context import WorkerContext
from kongtask.jobs.db_actor import DbActor
from kongtask.jobs.stats import stats_params
from kongtask.jobs.upkeep import Upkeep
from kongtask.runtime.clock import SystemClock, Timer
from kongtask.runtime.message import Fieldless

__all__ = [
    "QUARANTINED_MESSAGE",
    "SUSPECT_PREFIX",
    "Beat",
    "Check",
    "Deregister",
    "Liveness",
    "LivenessMessage",
    "Register",
    "pool_lock_key",
]

logger = logging.getLogger(__name__)


class Register(Fieldless):
    """Insert the pool's liveness record, release dead pools, start beating (answers True)."""

    __slots__ = ()


class Beat(Fieldless):
    """The heartbeat timer fired: move ``last_seen`` and release dead pools."""

    __slots__ = ()


class Check(Fieldless):
    """The check timer fired: release pools whose liveness lock is gone (or heartbeat old)."""

    __slots__ = ()


class Deregister(Fieldless):
    """A clean stop: stop beating, delete the pool's liveness record, drop its lock."""

    __slots__ = ()


LivenessMessage = Register | Beat | Check | Deregister


def pool_lock_key(pool_id: str) -> int:
    """The advisory lock key of ``pool_id``: 64 bits of its hash, as a signed bigint."""
    digest = hashlib.blake2b(pool_id.encode(), digest_size=8, person=b"kongtask-pool").digest()
    return int.from_bytes(digest, "big", signed=True)


#: How ``last_error`` starts for a job released from a dead pool (a crash suspect).
SUSPECT_PREFIX = "kongtask: the worker pool holding this job died"
#: ``format()`` text for a suspect's ``last_error``; ``%s`` is the dead pool's id.
SUSPECT_MESSAGE = (
    SUSPECT_PREFIX + " (pool %s lost its liveness lock or sent no heartbeat for too long); "
    "the job was given back and runs next as a crash suspect"
)
#: ``format()`` text for a quarantined job: the crash count, then the last dead pool.
QUARANTINED_MESSAGE = (
    "kongtask: quarantined: this job was running when its worker process died, %s times "
    "(last in pool %s); failed for good so it cannot take more workers down "
    "(crash_quarantine_after)"
)


class Liveness(DbActor):
    """Registers the pool, beats, releases dead pools, deregisters on a clean stop."""

    action = "liveness"
    max_attempts = 3

    def __init__(
        self,
        ctx: WorkerContext,
        nudge: Callable[[], None],
        lock_conninfo: str | None,
        stuck_threads: Callable[[], int] = lambda: 0,
    ) -> None:
        """``lock_conninfo``: a direct connection for the liveness lock (None: no lock);
        ``stuck_threads`` counts executor threads stuck in a timed-out handler."""
        super().__init__(ctx)
        self._nudge = nudge
        #: How many executor threads are stuck in a timed-out handler (sent with each beat).
        self._stuck_threads = stuck_threads
        self._clock = SystemClock(name=f"kongtask-heartbeat-{ctx.pool_id}")
        self._timer: Timer | None = None
        self._check_timer: Timer | None = None
        self._active = True
        self._lock_conninfo = lock_conninfo
        self._lock_key = pool_lock_key(ctx.pool_id)
        self._lock_conn: psycopg.Connection[Any] | None = None
        #: The lock was taken on a new session since the record last said so.
        self._lock_renewed = False
        #: Vacuums the jobs table when autovacuum has fallen far behind.
        self.upkeep = Upkeep(ctx)

    def handle(self, message: LivenessMessage) -> Any:
        match message:
            case Register():
                self._hold_lock()
                self._register()
                self._release_dead()
                self._look_after_table()
                self._schedule()
                self._schedule_check()
                return True
            case Beat():
                self._timer = None
                if self._active:
                    self._beat()
                    self._schedule()
            case Check():
                self._check_timer = None
                if self._active:
                    # Take the lock again at once if its session went (the record
                    # says so at the next beat, once the beat has shown it is ours).
                    self._hold_lock()
                    try:
                        self._release_dead()
                    finally:
                        self._drop_connection(broken=False)
                    self._schedule_check()
            case Deregister():
                self._active = False
                self._cancel()
                self.upkeep.close()
                self._write_stats()  # what the last jobs counted
                try:
                    self.run(
                        lambda conn: conn.execute(self.ctx.queries.deregister_pool, self._ids()),
                        "Removing the pool's liveness record",
                    )
                except psycopg.Error as exc:
                    # The record then ages out: other pools release what is left in time.
                    logger.warning(
                        "Could not remove the liveness record of %s: %s", self.ctx.pool_id, exc
                    )
                # Only once the record is gone: a record without its lock means a death.
                self._close_lock()
        return None

    def on_stop(self) -> None:
        self._active = False
        self._cancel()
        self._clock.close()
        self.upkeep.close()
        self._close_lock()
        super().on_stop()

    # --- the liveness lock ------------------------------------------------------------

    def _hold_lock(self) -> bool:
        """Make sure the lock connection is up and holds the pool's lock; False if it cannot."""
        if self._lock_conninfo is None:
            return False
        # A database call like run()'s: a probe meanwhile sees a database wait.
        with self._database_wait():
            return self._take_lock(self._lock_conninfo)

    def _take_lock(self, conninfo: str) -> bool:
        conn = self._lock_conn
        if conn is not None:
            try:
                conn.execute(self.ctx.queries.pool_lock_check)
                return True
            except psycopg.Error as exc:
                logger.warning(
                    "The liveness lock connection of pool %s broke (%s); taking the lock again",
                    self.ctx.pool_id,
                    exc,
                )
                self._close_lock()
        try:
            conn = connect(
                conninfo,
                self.ctx.settings.connection,
                application_name=f"{self.ctx.pool_id}-lock",
            )
        except psycopg.Error as exc:
            logger.error(
                "Pool %s could not open its liveness lock connection: %s", self.ctx.pool_id, exc
            )
            return False
        try:
            row = conn.execute(
                self.ctx.queries.take_pool_lock, {"lock_key": self._lock_key}
            ).fetchone()
        except psycopg.Error as exc:
            conn.close()
            logger.error("Pool %s could not take its liveness lock: %s", self.ctx.pool_id, exc)
            return False
        if row is None or not row[0]:
            conn.close()
            logger.error(
                "Pool %s: its liveness lock is held by another session; relying on the heartbeat",
                self.ctx.pool_id,
            )
            return False
        self._lock_conn = conn
        self._lock_renewed = True
        return True

    def _close_lock(self) -> None:
        conn, self._lock_conn = self._lock_conn, None
        if conn is not None and not conn.closed:
            try:
                conn.close()
            except Exception:
                logger.debug("Closing the liveness lock connection failed", exc_info=True)

    def _ids(self) -> dict[str, Any]:
        return {"pool_id": self.ctx.pool_id}

    def _schedule(self) -> None:
        if self._active and self._timer is None:
            ref = self.actor_ref
            self._timer = self._clock.call_later(
                self.ctx.settings.heartbeat_interval_s, lambda: ref.tell(Beat())
            )

    def _schedule_check(self) -> None:
        interval = self.ctx.settings.dead_pool_check_interval_s
        if self._active and self._check_timer is None and interval is not None:
            ref = self.actor_ref
            self._check_timer = self._clock.call_later(interval, lambda: ref.tell(Check()))

    def _cancel(self) -> None:
        for timer in (self._timer, self._check_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._check_timer = None

    def _register(self) -> None:
        ctx = self.ctx
        params = {
            "pool_id": ctx.pool_id,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "concurrency": ctx.settings.concurrency,
            "version": __version__,
            "tasks": sorted(ctx.tasks),
            "lock_key": self._lock_key if self._lock_conn is not None else None,
        }
        sent_at = ctx.ownership.now()
        self.run(
            lambda conn: conn.execute(ctx.queries.register_pool, params),
            "Registering the pool's liveness record",
        )
        self._lock_renewed = False
        ctx.ownership.beat(sent_at)

    def _beat(self) -> None:
        ownership = self.ctx.ownership
        self._hold_lock()
        try:
            # Sent no earlier than this: last_seen is at least this recent.
            sent_at = ownership.now()
            alive = self.run(
                lambda conn: conn.execute(
                    self.ctx.queries.heartbeat,
                    {**self._ids(), "stuck_threads": self._stuck_threads()},
                ).fetchone(),
                "Heartbeat",
            )
            if alive is None:
                # Before registering again: jobs claimed until now may be another pool's.
                ownership.lost(ownership.now())
                logger.warning(
                    "Pool %s was declared dead by another pool (no heartbeat for over %g s); "
                    "its jobs were given back: the one(s) running may run twice, the ones "
                    "not started are dropped. Registering again.",
                    self.ctx.pool_id,
                    self.ctx.settings.pool_dead_after_s,
                )
                self._register()
            else:
                ownership.beat(sent_at)
                if self._lock_renewed:
                    self._register()  # the record names the lock, and since when
            self._release_dead()
            self._write_stats()
            self._look_after_table()
        except psycopg.Error as exc:
            if self.stopping(exc):
                logger.debug(
                    "Heartbeat of pool %s cut short by its stop: %s", self.ctx.pool_id, exc
                )
            else:
                logger.error("Heartbeat of pool %s failed: %s", self.ctx.pool_id, exc)
        finally:
            # Between beats the connection goes back to the pool for others.
            self._drop_connection(broken=False)

    def _look_after_table(self) -> None:
        """Read the jobs table's dead rows and let upkeep vacuum it if they call for it."""
        upkeep = self.upkeep
        if not upkeep.due():
            return
        params = {"schema": self.ctx.settings.schema}
        try:
            row = self.run(
                lambda conn: conn.execute(self.ctx.queries.jobs_dead_rows, params).fetchone(),
                "Reading the jobs table's dead rows",
            )
        except psycopg.Error as exc:
            logger.debug("Could not read the jobs table's dead rows: %s", exc)
            return
        if row is not None:
            upkeep.consider(int(row[0]), int(row[1]))

    def _write_stats(self) -> None:
        """Add the outcome counts since the last beat to the per-minute table."""
        ctx = self.ctx
        taken = ctx.stats.take()
        if not taken:
            return
        params = stats_params(ctx.pool_id, taken)
        try:
            self.run(
                lambda conn: conn.execute(ctx.queries.record_task_stats, params),
                "Recording the task statistics",
            )
        except psycopg.Error as exc:
            ctx.stats.give_back(taken)  # the next beat tries again
            logger.warning("Could not record the task statistics of %s: %s", ctx.pool_id, exc)

    def _release_dead(self) -> None:
        ctx = self.ctx
        settings = ctx.settings
        params = {
            "pool_id": ctx.pool_id,
            "dead_after_s": settings.pool_dead_after_s,
            "quarantine_after": settings.crash_quarantine_after,
            "suspect_message": SUSPECT_MESSAGE,
            "quarantined_message": QUARANTINED_MESSAGE,
        }

        def release(conn: psycopg.Connection[Any]) -> Any:
            return conn.execute(ctx.queries.release_dead_pools, params).fetchone()

        try:
            row = self.run(release, "Releasing dead pools")
        except psycopg.Error as exc:
            if self.stopping(exc):
                logger.debug("Releasing dead pools cut short by the pool's stop: %s", exc)
            else:
                logger.error("Releasing dead pools failed (trying again next beat): %s", exc)
            return
        if row is None or not row[0]:
            return
        pools, jobs, queues, quarantined = row
        logger.warning(
            "Released %d job(s) and %d named queue(s) held by %d dead pool(s) (its liveness "
            "lock was free, or it sent no heartbeat for over %g s): %s",
            jobs,
            queues,
            len(pools),
            settings.pool_dead_after_s,
            ", ".join(pools),
        )
        if quarantined:
            logger.error(
                "Quarantined job(s) %s: each was running when its worker died %d times; "
                "failed for good",
                ", ".join(str(job_id) for job_id in quarantined),
                settings.crash_quarantine_after,
            )
        # Released jobs may be runnable right away.
        self._nudge()
