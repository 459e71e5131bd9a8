"""Ownership of claimed jobs: whether a buffered job may have been taken from this pool.

A claimed job waits in the local queue until an executor is free, and its
lock can be taken away meanwhile: live pools release a pool whose heartbeat
is older than ``pool_dead_after_s`` (a pool paused by SIGSTOP, a frozen VM, a
stalled host), an operator force-unlocks it, the stale-lock sweep frees it.
Another pool may then run the job, and running it here too would run it twice.

Every buffered job carries the time its ownership was last known (its claim
started, or a check confirmed it). Before an executor starts a job,
:meth:`Ownership.doubt` compares that time with the clock, three float
comparisons and no statement; the claimer re-reads the locks (one statement
for the job and everything buffered) only when

- the job was known owned longer ago than the bound, or
- the pool's last heartbeat that got through was sent longer ago than the
  bound (another pool may have released it since), or
- a heartbeat found the pool's liveness record deleted (declared dead) after
  the job was last known owned.

The bound lies halfway between ``heartbeat_interval_s`` and
``pool_dead_after_s``: a pool beating normally never reaches it, and a
release needs a heartbeat older than ``pool_dead_after_s``. The clock counts
the time the process was stopped (and, on Linux, the time the machine was
suspended: ``CLOCK_BOOTTIME``), so a pause shows without the database.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

__all__ = ["Ownership", "ownership_clock"]


def _clock() -> Callable[[], float]:
    boottime: int | None = getattr(time, "CLOCK_BOOTTIME", None)
    if boottime is None:
        return time.monotonic
    # A partial of the C function: no Python frame on the per-job path.
    return functools.partial(time.clock_gettime, boottime)


#: Seconds from an arbitrary start, counting a stopped process and (Linux) a suspended host.
ownership_clock = _clock()


class Ownership:
    """What this pool knows about still holding its claimed jobs (shared by threads).

    The liveness actor writes (:meth:`beat`, :meth:`lost`), executors read
    (:meth:`doubt`); each is a single float store or load under the GIL.
    """

    def __init__(self, heartbeat_interval_s: float, pool_dead_after_s: float) -> None:
        self.bound_s = (heartbeat_interval_s + pool_dead_after_s) / 2
        now = ownership_clock()
        #: When the last heartbeat (or registration) that found the record was sent.
        self.beat_at = now
        #: When a heartbeat last found the record gone: jobs known owned before may not be.
        self.lost_at = -float("inf")

    @staticmethod
    def now() -> float:
        """The clock the stamps are read on."""
        return ownership_clock()

    def beat(self, sent_at: float) -> None:
        """A heartbeat sent at ``sent_at`` found the liveness record in place."""
        self.beat_at = sent_at

    def lost(self, at: float) -> None:
        """The liveness record was found deleted at ``at``: another pool declared this one dead.

        Written before the registration that follows, so a reader that sees the
        new heartbeat also sees this.
        """
        self.lost_at = at

    def doubt(self, known_at: float) -> str | None:
        """Why a job known owned at ``known_at`` may no longer be this pool's; None if it is.

        The cheap test on every job start: no statement unless it returns a reason.
        """
        # beat_at before lost_at: the liveness actor writes them in the other order.
        beat_at = self.beat_at
        lost_at = self.lost_at
        now = ownership_clock()
        bound = self.bound_s
        if now - known_at <= bound and now - beat_at <= bound and known_at > lost_at:
            return None
        if known_at <= lost_at:
            return "another pool declared this pool dead and released its jobs"
        if now - beat_at > bound:
            return f"this pool's last heartbeat went out {now - beat_at:.1f} s ago"
        return f"the job was claimed (or last confirmed) {now - known_at:.1f} s ago"
