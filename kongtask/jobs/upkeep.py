"""Jobs-table upkeep: the worker vacuums the jobs table when autovacuum has fallen far behind.

A finished job's row is deleted, but its entry in the claim's index stays
until the table is vacuumed, and every claim walks the index from its oldest
entries, where those dead ones gather: with 200,000 of them a claim reads
about 700 index pages of dead entries (1.6 times the vacuumed claim; see the
performance guide). Autovacuum normally clears them long before that. When it
is off, throttled or busy with other tables, the worker does it itself: at
each heartbeat (and at start-up) the liveness actor asks :meth:`Upkeep.due`,
reads the table's dead and live row counts, and :meth:`Upkeep.consider` starts
``VACUUM (SKIP_LOCKED, ANALYZE)`` on a connection of its own, in a thread of
its own, so neither the heartbeat nor the claims wait for it.

The rule, in :func:`wants_vacuum`: at least ``vacuum_after_dead_rows`` dead
rows (50,000 by default; ``None`` turns upkeep off) and at least a fifth of
the live ones (autovacuum's own default share, so a large backlog is not
vacuumed for a small share of dead rows), at most once every 30 s per pool.
Several workers may decide at once; ``SKIP_LOCKED`` makes all but one do
nothing. A role that does not own the table cannot vacuum it: PostgreSQL then
skips it with a warning, and upkeep says so once and stops trying.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

from kongtask.db.connecting import cancel_and_wait, connect, without_deadline
from kongtask.jobs.context import WorkerContext

__all__ = ["LIVE_SHARE", "MIN_INTERVAL_S", "Upkeep", "wants_vacuum"]

logger = logging.getLogger(__name__)

#: At most one vacuum per pool per this many seconds.
MIN_INTERVAL_S = 30.0

#: The dead rows must also be at least this share of the live ones.
LIVE_SHARE = 0.2

#: SQLSTATE of "skipping vacuum ... lock not available": another session vacuums it.
_LOCK_NOT_AVAILABLE = "55P03"

#: How long a stopping worker waits for a vacuum it cancelled to end.
_CLOSE_WAIT_S = 5.0


def wants_vacuum(dead: int, live: int, threshold: int | None, since_last_s: float | None) -> bool:
    """Whether ``dead`` dead rows beside ``live`` live ones call for a vacuum now.

    ``threshold`` is ``vacuum_after_dead_rows`` (None: never); ``since_last_s``
    the time since this pool last started one (None: never).
    """
    if threshold is None or _too_soon(since_last_s):
        return False
    return dead >= threshold and dead >= LIVE_SHARE * live


def _too_soon(since_last_s: float | None) -> bool:
    """Whether this pool started a vacuum less than :data:`MIN_INTERVAL_S` ago."""
    return since_last_s is not None and since_last_s < MIN_INTERVAL_S


class Upkeep:
    """Starts and tracks one pool's vacuums of the jobs table (at most one at a time)."""

    def __init__(self, ctx: WorkerContext, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._ctx = ctx
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection[Any] | None = None
        self._started_at: float | None = None
        #: Upkeep is off, or the role may not vacuum the table: never try.
        self._off = ctx.settings.vacuum_after_dead_rows is None
        self._closing = False

    def due(self) -> bool:
        """Whether reading the row counts is worth it now (upkeep on, idle, not too soon)."""
        with self._lock:
            return self._idle() and not _too_soon(self._since_last(self._monotonic()))

    def consider(self, dead: int, live: int) -> bool:
        """Start a vacuum if the counts call for one; True if one was started."""
        threshold = self._ctx.settings.vacuum_after_dead_rows
        with self._lock:
            now = self._monotonic()
            if not (self._idle() and wants_vacuum(dead, live, threshold, self._since_last(now))):
                return False
            self._started_at = now
            thread = threading.Thread(
                target=self._vacuum,
                args=(dead, live),
                name=f"kongtask-vacuum-{self._ctx.pool_id}",
                daemon=True,
            )
            self._thread = thread
        thread.start()
        return True

    def _idle(self) -> bool:
        """Upkeep on, not closing, no vacuum running (the caller holds the lock)."""
        return not (self._off or self._closing or self._thread is not None)

    def _since_last(self, now: float) -> float | None:
        """Seconds since this pool last started a vacuum (None: never)."""
        return None if self._started_at is None else now - self._started_at

    def close(self) -> None:
        """Stop for good: cancel a vacuum that runs (the next worker redoes it) and wait."""
        with self._lock:
            self._closing = True
            thread, conn = self._thread, self._conn
        cancel_and_wait(thread, conn, _CLOSE_WAIT_S, "the jobs table's vacuum")

    def _vacuum(self, dead: int, live: int) -> None:
        ctx = self._ctx
        notices: list[tuple[str | None, str]] = []
        started = time.perf_counter()
        try:
            logger.info(
                "Vacuuming the jobs table: %d dead rows beside %d live ones (autovacuum has not "
                "caught up; vacuum_after_dead_rows=%d)",
                dead,
                live,
                ctx.settings.vacuum_after_dead_rows,
            )
            conn = connect(
                ctx.conninfo, ctx.settings.connection, application_name=f"{ctx.pool_id}-vacuum"
            )
            with self._lock:
                closing = self._closing
                self._conn = conn
            try:
                if closing:
                    return
                conn.add_notice_handler(
                    lambda notice: notices.append((notice.sqlstate, notice.message_primary or ""))
                )
                # A vacuum of a large table may outlast kongtask's statement deadline.
                with without_deadline(conn):
                    conn.execute(ctx.queries.vacuum_jobs)
            finally:
                with self._lock:
                    self._conn = None
                conn.close()
        except psycopg.Error as exc:
            if self._closing:
                logger.info("The jobs table's vacuum was cancelled: the worker is stopping")
            else:
                logger.warning("Vacuuming the jobs table failed (trying again later): %s", exc)
            return
        finally:
            with self._lock:
                self._thread = None
        skipped = [
            message
            for sqlstate, message in notices
            if "skipping" in message and sqlstate != _LOCK_NOT_AVAILABLE
        ]
        if skipped:
            with self._lock:
                self._off = True
            logger.warning(
                "The jobs table was not vacuumed (%s); leaving it to autovacuum. Run kongtask as "
                "the table's owner for its upkeep, or set vacuum_after_dead_rows=None to silence "
                "this",
                skipped[0],
            )
            return
        if any(sqlstate == _LOCK_NOT_AVAILABLE for sqlstate, _ in notices):
            logger.info("The jobs table is being vacuumed by another session; left to it")
            return
        logger.info("Vacuumed the jobs table in %.2f s", time.perf_counter() - started)
